"""The recovery experiment: how much of the teacher does distillation give a pruned student back,
which part of the loss earns it, and does it hold on text of another kind?

Usage (CPU, about 75 minutes on 2 quiet cores, at most 90):
    python benchmarks/recovery.py --preset cpu
GPU (512-token sequences, 8 x 200 steps per run, bf16):
    python benchmarks/recovery.py --preset gpu --tag h100
More runs on the CPU preset's students and cache (learning rate, KL direction, schedule, cnmse;
recovery_extra_variants.yaml; after the CPU preset in the same --out, about 45 minutes):
    python benchmarks/recovery.py --preset cpu --variants benchmarks/recovery_extra_variants.yaml --tag cpu-extra
Four times the CPU budget per run, CE only against 0.5 CE + 0.5 KD with two seeds each, on the
depth + width student only (recovery_long_variants.yaml; about 50 minutes on 2 cores):
    python benchmarks/recovery.py --preset cpu-long --out out/recovery-long

Pipeline, each stage the user-facing command:
  1. ``unidistill prune`` twice from SmolLM2-135M-Instruct (30 blocks, 134.5 M parameters), with
     calibration on the train split of ``--data``:
     depth: drop 10 blocks by KL (20 blocks, 73.7 % of the parameters);
     width: drop 2 blocks by KL, MLP x0.42, hidden x0.83 (28 blocks, MLP 640, hidden 504, 54.7 %);
  2. ``unidistill cache-build``: ONE training cache of the train split of ``--data`` for both
     students (top-64 + tail, exact at T = 1 and 2; the teacher layers the uniform, last and
     original maps send both students' aligned blocks to, see ``recovery_variants.yaml``), and a
     held-out teacher cache (16 x 256 tokens) of each held-out text: the held-out split of
     ``--data`` (Python docs, never trained on) and ``builtin:kjv_bible`` (English prose of another
     kind, evaluation only);
  3. ``unidistill ablate`` once per student with its runs from ``benchmarks/recovery_variants.yaml``
     (the same token budget each), every model evaluated on both held-out texts;
  4. ``unidistill report`` on each ablation.
Results: benchmarks/results/recovery_<tag>.{json,md,png}: per student, every run on both texts,
the seed spread (runs repeated with seed 1), the best recipe on each text and a computed verdict.

Wall time of the CPU preset (2 cores): prune 2 x ~2.5 min, caches ~4 min, 20 runs x (40 steps x
~3.5 s + two evaluations ~25 s) ~ 55 min, teacher evaluations ~2 min: ~70-75 minutes.

A stopped experiment continues where it stopped (the same command, the same --out). Before a
stage runs, ``--out/stages.json`` records the options it runs with; a stage is skipped only when
that record matches AND its output is complete: a pruned student is complete when its folder
exists with config and weights (prune writes it under another name and renames it when done),
a cache when its manifest says ``status: complete`` (the writer's last step). A cache stopped
mid-build with the same options is resumed; an output made with other options is rebuilt
(``--overwrite``). The training cache's layers follow from the pruned students, so a student
pruned again with other blocks rebuilds it. ``ablate`` always runs: it keeps each run and
evaluation made with the same settings (student files, cache fingerprints, variant) and redoes the
rest, so a rebuilt student or cache retrains the runs and a changed variant retrains only that run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine  # noqa: E402

RESULTS = HERE / "results"
TEACHER = "builtin:smollm2"
TEACHER_BLOCKS = 30
PRESETS = {
    "cpu": dict(device="cpu", seq_len=256, train_sequences=200, heldout_sequences=16, batch_size=4,
                steps=40, eval_sequences=16, calib_sequences=32, bf16=False),
    "gpu": dict(device="cuda", seq_len=512, train_sequences=1600, heldout_sequences=32,
                batch_size=8, steps=200, eval_sequences=32, calib_sequences=64, bf16=True),
    # 4x the CPU preset's tokens per run, on fresh text (no epoch repeats), with 4x the held-out
    # tokens; few runs (recovery_long_variants.yaml): do CE and distillation part with more tokens?
    "cpu-long": dict(device="cpu", seq_len=256, train_sequences=640, heldout_sequences=64,
                     batch_size=4, steps=160, eval_sequences=64, calib_sequences=32, bf16=False),
}
VARIANTS = {"cpu-long": "recovery_long_variants.yaml"}  # other presets: recovery_variants.yaml
# the two students: stage name -> prune options (calibration text and size are added)
STUDENTS = {
    "depth": ["--drop-layers", "10", "--depth-method", "kl"],
    "width": ["--drop-layers", "2", "--depth-method", "kl", "--mlp-keep", "0.42", "--hidden-keep", "0.83"],
}
LAYER_MAPS = ("uniform", "last", "original")  # the maps the runs use: their teacher layers are cached
OTHER_TEXT = "builtin:kjv_bible"  # evaluation only: English prose of another kind
TOP_K = 64
SEED_SUFFIX = ".seed1"
STAGES_FILE = "stages.json"  # in --out: the options each stage's output is made with


def unidistill(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "unidistill"), *args]


def _execute(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def _say(message: str) -> None:
    print(message, flush=True)


def command_options(argv: list[str]) -> dict:
    """``[exe, cmd, --flag, value, --switch, ...]`` -> {"command": cmd, "--flag": value,
    "--switch": True}: what a stage's output is made with, in a form whose changes read well; a
    repeated flag holds the list of its values."""
    options, i = {"command": argv[1]}, 2
    while i < len(argv):
        flag = argv[i]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = True, i + 1
        if flag in options:  # a repeated flag (ablate's --heldout): its values in order
            previous = options[flag]
            options[flag] = [*(previous if isinstance(previous, list) else [previous]), value]
        else:
            options[flag] = value
    return options


def pruned_student_complete(folder: Path) -> bool:
    """prune saves into a temporary folder and renames it: a folder with config and weights is whole."""
    config = folder / "config.json"
    return (config.is_file() and "unidistill_provenance" in json.loads(config.read_text())
            and any(folder.glob("*.safetensors")))


def cache_complete(folder: Path) -> bool:
    """The writer marks a cache ``complete`` in its manifest as its very last step."""
    from unidistill.storage.manifest import STATUS_COMPLETE
    from unidistill.storage.manifest import read_manifest

    return (read_manifest(folder) or {}).get("status") == STATUS_COMPLETE


class Stages:
    """Runs the pipeline's commands, skipping those whose output is complete and made with the
    same options (recorded in ``out/stages.json`` before each command starts)."""

    def __init__(self, out: Path, log: Callable[[str], None] = _say):
        self.path = out / STAGES_FILE
        self.recorded = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.times: dict = {}
        self.log = log

    def run(self, name: str, argv: list[str], output: Path | None = None,
            complete: Callable[[Path], bool] | None = None, resumable: bool = False) -> None:
        """Run ``argv`` unless ``output`` is ``complete`` and was made with the same options.

        ``resumable``: the command continues its own unfinished output given the same options
        (cache-build); otherwise an existing output is replaced (``--overwrite``). Stages
        without ``output`` always run (ablate and report decide themselves what to keep)."""
        from unidistill.storage.files import atomic_write_json
        from unidistill.storage.manifest import diff_settings

        options = command_options(argv)
        same = self.recorded.get(name) == options
        if output is not None and same and complete(output):
            self.log(f"[{name}] complete, made with the same options: skipped")
            self.times[name] = None
            return
        if output is not None and output.exists() and any(output.iterdir()):
            if not same:
                why = ("; ".join(diff_settings(self.recorded[name], options, "before", "now"))
                       if name in self.recorded else "no record of the options it was made with")
                self.log(f"[{name}] {output} is replaced: {why}")
                argv = [*argv, "--overwrite"]
            elif not resumable:
                self.log(f"[{name}] {output} is incomplete: made again")
                argv = [*argv, "--overwrite"]
            else:
                self.log(f"[{name}] {output} is unfinished: continuing it")
        if output is not None:
            self.recorded[name] = options
            atomic_write_json(self.path, self.recorded)
        self.log(f"[{name}] {' '.join(argv)}")
        t0 = time.perf_counter()
        _execute(argv)
        self.times[name] = round(time.perf_counter() - t0, 1)


def heldout_texts(opts) -> list[tuple[str, str, str]]:
    """(name, source, split) of the held-out texts: the training text's held-out split, then the
    other kind of text."""
    from unidistill.ablate import heldout_name

    return [(heldout_name(opts.data), opts.data, opts.heldout_split),
            (heldout_name(OTHER_TEXT), OTHER_TEXT, "heldout")]


def load_variants(path) -> dict:
    """The variants file: common settings, the seed-1 repeats, each student's aligned blocks and runs."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    unknown = sorted(set(spec.get("students") or {}) - set(STUDENTS))
    if unknown or not spec.get("students"):
        raise SystemExit(f"{path}: 'students' names {unknown or 'no student'}; expected a section "
                         f"for some of {sorted(STUDENTS)}, each with align_layers and variants")
    for name in spec.get("repeat_with_seed_1") or []:
        for student, section in spec["students"].items():
            if name not in [v["name"] for v in section["variants"]]:
                raise SystemExit(f"{path}: repeat_with_seed_1 names {name!r}, which student "
                                 f"{student!r} has no run of")
    return spec


def student_variants(spec: dict, student: str) -> list[dict]:
    """A student's runs, its aligned blocks on the hidden-loss ones, then the seed-1 repeats."""
    section = spec["students"][student]
    runs = [{**v, "align_layers": str(section["align_layers"])} if v.get("gamma", 0) > 0 else dict(v)
            for v in section["variants"]]
    repeats = [{**v, "name": v["name"] + SEED_SUFFIX, "seed": 1, "data_seed": 1}
               for name in spec.get("repeat_with_seed_1") or [] for v in runs if v["name"] == name]
    return runs + repeats


def cache_layers(spec: dict, students: dict[str, Path]) -> list[int]:
    """The teacher layers (hidden_states indices) that the uniform, last and original maps send
    every student's aligned blocks to: what the training cache holds."""
    from unidistill.models.layer_map import parse_layer_map, provenance_from_config

    layers: set[int] = set()
    for student, folder in students.items():
        config = json.loads((folder / "config.json").read_text())
        aligned = [int(x) for x in str(spec["students"][student]["align_layers"]).split(",")]
        for strategy in LAYER_MAPS:
            mapping = parse_layer_map(strategy, config["num_hidden_layers"], TEACHER_BLOCKS,
                                      provenance=provenance_from_config(config))
            layers.update(mapping[i] for i in aligned)
    return sorted(layers)


def run(opts, log: Callable[[str], None] = _say) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_variants(opts.variants)
    stages = Stages(out, log)
    t0 = time.perf_counter()
    students = {name: out / f"student-{name}" for name in STUDENTS if name in spec["students"]}
    for name in students:
        prune = STUDENTS[name]
        stages.run(f"prune_{name}", unidistill(
            "prune", "--model", TEACHER, "--out", str(students[name]), *prune, "--calib-data",
            opts.data, "--calib-sequences", str(opts.calib_sequences), "--device", opts.device),
            students[name], pruned_student_complete)
    layers = cache_layers(spec, students)
    build = ["--teacher", TEACHER, "--seq-len", str(opts.seq_len), "--logits", "topk", "--top-k",
             str(TOP_K), "--batch-size", "8", "--device", opts.device, "--quiet"]
    cache = out / "cache"
    stages.run("cache_train", unidistill(
        "cache-build", *build, "--data", opts.data, "--split", "train", "--layers",
        ",".join(map(str, layers)), "--out", str(cache), "--max-sequences", str(opts.train_sequences)),
        cache, cache_complete, resumable=True)
    heldout_args = []
    for text, source, split in heldout_texts(opts):
        held = out / f"heldout-{text}"
        stages.run(f"cache_heldout_{text}", unidistill(
            "cache-build", *build, "--data", source, "--split", split, "--layers", "none", "--out",
            str(held), "--max-sequences", str(opts.heldout_sequences)), held, cache_complete,
            resumable=True)
        heldout_args += ["--heldout", source, "--heldout-split", split, "--heldout-cache", str(held)]
    common = ["--max-steps", str(opts.steps), "--per-device-train-batch-size", str(opts.batch_size)]
    if opts.device == "cpu":
        common.append("--use-cpu")
    tables, all_runs = {}, {}
    for name in students:
        runs = all_runs[name] = out / f"runs-{name}"
        variants = _variants_file(opts, spec, name, out)
        stages.run(f"ablate_{name}", unidistill(
            "ablate", "--cache", str(cache), "--student", str(students[name]), "--teacher", TEACHER,
            *heldout_args, "--out", str(runs), "--variants", str(variants), *common,
            "--eval-sequences", str(opts.eval_sequences), "--device", opts.device))
        stages.run(f"report_{name}", unidistill("report", str(runs)))
        tables[name] = json.loads((runs / "ablation.json").read_text())
    times = {**stages.times, "total": round(time.perf_counter() - t0, 1)}
    return {"times_s": times, "tables": tables, "runs": all_runs, "cache_layers": layers,
            "spec": spec,
            "students": {name: json.loads((folder / "config.json").read_text())["unidistill_provenance"]
                         for name, folder in students.items()}}


def _variants_file(opts, spec: dict, student: str, out: Path) -> Path:
    """One student's ablate variants file, with bf16 added to every run for the GPU preset."""
    import yaml

    common = dict(spec["common"])
    if opts.bf16:
        common["bf16"] = True
    text = yaml.safe_dump({"common": common, "variants": student_variants(spec, student)},
                          sort_keys=False)
    path = out / f"variants-{student}.yaml"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _train_seconds(runs: Path, name: str):
    path = runs / name / "train_speed.json"
    return json.loads(path.read_text()).get("train_seconds") if path.is_file() else None


# ---- the analysis ------------------------------------------------------------------------------

REFERENCE_ROWS = ("teacher", "student (before)")


def seed_spread(rows: dict[str, dict], texts: list[str], repeats: list[str]) -> dict:
    """|perplexity seed 0 - seed 1| per repeated recipe and text, and the max over recipes."""
    per_recipe = {}
    for name in repeats:
        a, b = rows.get(name), rows.get(name + SEED_SUFFIX)
        if a is None or b is None:
            continue
        per_recipe[name] = {t: abs(a["heldout_sets"][t]["perplexity"] - b["heldout_sets"][t]["perplexity"])
                            for t in texts}
    spread = {t: max((d[t] for d in per_recipe.values()), default=None) for t in texts}
    return {"per_recipe": per_recipe, "max": spread}


def verdict(rows: dict[str, dict], texts: list[str], spread: dict) -> dict:
    """The best seed-0 recipe by held-out perplexity on each text, and whether it beats CE only by
    more than twice the seed spread on both texts."""
    candidates = [n for n in rows if n not in REFERENCE_ROWS and not n.endswith(SEED_SUFFIX)]
    ce = rows.get("ce")
    result = {}
    for text in texts:
        best = min(candidates, key=lambda n: rows[n]["heldout_sets"][text]["perplexity"])
        margins, beats = {}, {}
        for t in texts:
            margins[t] = (None if ce is None else
                          ce["heldout_sets"][t]["perplexity"] - rows[best]["heldout_sets"][t]["perplexity"])
            beats[t] = (margins[t] is not None and spread[t] is not None and margins[t] > 2 * spread[t])
        result[text] = {"best": best, "ce_minus_best_perplexity": margins,
                        "beats_ce_by_more_than_2x_spread": beats,
                        "beats_ce_on_both_texts": all(beats.values())}
    return result


def versus_ce(row: dict, ce: dict | None, text: str, spread: float | None) -> str:
    """The run's perplexity minus CE only's on a text, or 'no measurable difference' when smaller
    than the seed spread."""
    if ce is None or row is ce:
        return "-"
    diff = row["heldout_sets"][text]["perplexity"] - ce["heldout_sets"][text]["perplexity"]
    if spread is not None and abs(diff) < spread:
        return "no measurable difference"
    return f"{diff:+.2f}"


def write_results(opts, result: dict) -> None:
    from unidistill.ablate import format_ratio, uniform_baseline_note

    texts = [t for t, _, _ in heldout_texts(opts)]
    sources = {t: f"`{s}` ({split})" for t, s, split in heldout_texts(opts)}
    repeats = list(result["spec"].get("repeat_with_seed_1") or [])
    command = "python " + " ".join(sys.argv)
    times = result["times_s"]
    students = {}
    for name, table in result["tables"].items():
        rows = {r["name"]: r for r in table["rows"]}
        for r in table["rows"]:
            r["train_seconds"] = _train_seconds(result["runs"][name], r["name"])
        spread = seed_spread(rows, texts, repeats)
        prov = result["students"][name]
        students[name] = {
            "prune": STUDENTS[name],
            "pruned": {k: prov.get(k) for k in ("dropped_blocks", "num_hidden_layers", "hidden_size",
                                                 "intermediate_size", "parameters_before",
                                                 "parameters_after")},
            "align_layers": result["spec"]["students"][name]["align_layers"],
            "uniform_nll": table.get("uniform_nll"), "vocab_size": table.get("vocab_size"),
            "rows": table["rows"], "seed_spread": spread,
            "verdict": verdict(rows, texts, spread["max"]), "uniform_note": uniform_baseline_note(table)}
    out = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(opts.device),
           "settings": {k: v for k, v in vars(opts).items() if k not in ("results", "out")},
           "heldout_texts": {t: s for t, s in zip(texts, sources.values())},
           "cache_layers": result["cache_layers"], "common": result["spec"]["common"],
           "repeat_with_seed_1": repeats, "times_s": times, "students": students}
    results_dir = Path(opts.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"recovery_{opts.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(students, texts, results_dir / f"recovery_{opts.tag}.png")

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    minutes = {k: num(None if v is None else v / 60, ".1f") for k, v in times.items()}
    md = [f"# Recovery experiment ({opts.tag})", "",
          f"`{command}` on {out['date']}, {json.dumps(out['machine'])}", "",
          f"Teacher SmolLM2-135M-Instruct. The students train from ONE cache of "
          f"{opts.train_sequences} x {opts.seq_len} tokens of `{opts.data}` (train split; top-{TOP_K} "
          f"+ tail, exact at T = 1 and 2; teacher layers {result['cache_layers']}); every run "
          f"{opts.steps} steps x {opts.batch_size} x {opts.seq_len} tokens, common settings "
          f"`{json.dumps(result['spec']['common'])}`. Held-out, never trained on, {opts.eval_sequences} "
          f"x {opts.seq_len} tokens each: " + "; ".join(f"**{t}** = {s}" for t, s in sources.items()) + ".",
          "",
          "Ppl ÷ T, acc ÷ T: the run's held-out perplexity and next-token accuracy over the "
          "teacher's. Gap %: share of the untrained student's log-perplexity gap to the teacher "
          "closed. Top-1: agreement with the teacher's most likely token. KL: KL(teacher || model) "
          "at T = 1 over the cached top-64 + tail. vs CE: perplexity minus CE only's on that text, "
          "'no measurable difference' when smaller than the seed spread.",
          f"Seed spread: runs {repeats} trained again with seed 1 and data_seed 1 (`<name>{SEED_SUFFIX}`); "
          "chosen in the runs file (CE only, the baseline, the recipes the field expects to win, "
          "and any the file says were added to check a first result). The spread is the max over "
          "those recipes of |perplexity seed 0 - seed 1|."]
    for name, st in students.items():
        pr = st["pruned"]
        rows = {r["name"]: r for r in st["rows"]}
        ce = rows.get("ce")
        md += ["", f"## Student `{name}`: `unidistill prune {' '.join(STUDENTS[name])}`", "",
               f"{pr['num_hidden_layers']} blocks, hidden {pr['hidden_size']}, MLP {pr['intermediate_size']}: "
               f"{pr['parameters_after']:,} of {pr['parameters_before']:,} parameters "
               f"({100 * pr['parameters_after'] / pr['parameters_before']:.1f} %); dropped blocks "
               f"{pr['dropped_blocks']}. Hidden loss on student blocks {st['align_layers']}."
               + (f" {st['uniform_note']}" if st["uniform_note"] else ""), ""]
        header = ["run", "α", "β", "γ", "T", "KL", "map", "hidden loss", "warm-up", "lr", "schedule"]
        for t in texts:
            header += [f"{t} ppl", "ppl ÷ T", "acc", "acc ÷ T", "gap %", "top-1", "KL", "vs CE"]
        header.append("train min")
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in st["rows"]:
            s = r["settings"]
            hidden = (s.get("gamma") or 0) > 0
            cells = [r["name"], num(s.get("alpha"), "g"), num(s.get("beta"), "g"), num(s.get("gamma"), "g"),
                     num(s.get("kd_temperature"), "g") if (s.get("beta") or 0) > 0 else "-",
                     s.get("kl_direction", "-") if (s.get("beta") or 0) > 0 else "-",
                     s.get("layer_map", "-") if hidden else "-", s.get("hidden_loss", "-") if hidden else "-",
                     str(s.get("hidden_warmup_steps") or "-"), num(s.get("learning_rate"), "g"),
                     str(s.get("lr_scheduler_type") or "-")]
            for t in texts:
                m = r["heldout_sets"][t]
                kl = m.get("kl_to_teacher")
                cells += [num(m["perplexity"], ".2f"), format_ratio(m.get("perplexity_ratio")),
                          num(m.get("accuracy"), ".3f"), format_ratio(m.get("accuracy_ratio")),
                          num(m.get("recovery_pct"), ".1f"), num(m.get("top1_agreement"), ".3f"),
                          num(None if kl is None else max(kl, 0.0), ".3f"),
                          "-" if r["name"] in REFERENCE_ROWS else versus_ce(r, ce, t, st["seed_spread"]["max"][t])]
            cells.append(num(None if r["train_seconds"] is None else r["train_seconds"] / 60, ".1f"))
            md.append("| " + " | ".join(cells) + " |")
        sp = st["seed_spread"]
        md += ["", "Seed spread (|perplexity seed 0 - seed 1|): " + "; ".join(
            f"{recipe}: " + ", ".join(f"{t} {d[t]:.2f}" for t in texts) for recipe, d in sp["per_recipe"].items())
            + ". Max: " + ", ".join(f"{t} {num(sp['max'][t], '.2f')}" for t in texts) + ".", ""]
        for t, v in st["verdict"].items():
            margins = ", ".join(f"{u} {num(v['ce_minus_best_perplexity'][u], '+.2f')} (2 x spread "
                                f"{num(None if sp['max'][u] is None else 2 * sp['max'][u], '.2f')})"
                                for u in texts)
            md.append(f"- Best by {t} perplexity: **{v['best']}**; CE only minus it: {margins}; "
                      f"beats CE only by more than twice the seed spread on both texts: "
                      f"**{'yes' if v['beats_ce_on_both_texts'] else 'no'}**.")
    md += ["", "Wall time (minutes): " + ", ".join(f"{k} {v}" for k, v in minutes.items()) + ".", "",
           f"![recovery](recovery_{opts.tag}.png)"]
    (results_dir / f"recovery_{opts.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def plot(students: dict, texts: list[str], path: Path) -> None:
    """Perplexity ÷ teacher of every run, on each held-out text, one panel per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(students), squeeze=False,
                             figsize=(sum(0.75 * len(s["rows"]) + 2 for s in students.values()), 4.2))
    width = 0.8 / len(texts)
    for ax, (name, st) in zip(axes[0], students.items()):
        rows = [r for r in st["rows"] if r["name"] not in REFERENCE_ROWS]
        for k, t in enumerate(texts):
            values = [r["heldout_sets"][t]["perplexity_ratio"] for r in rows]
            bars = ax.bar([i + (k - (len(texts) - 1) / 2) * width for i in range(len(rows))], values,
                          width, label=t)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=6, rotation=90, padding=2)
        before = next(r for r in st["rows"] if r["name"] == "student (before)")["heldout_sets"]
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=35, ha="right", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("held-out perplexity ÷ teacher's (1 = teacher)")
        ax.set_title(f"{name} ({st['pruned']['parameters_after'] / 1e6:.1f} M params); before: "
                     + ", ".join(f"{t} {before[t]['perplexity_ratio']:.3g}" for t in texts), fontsize=9)
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def apply_preset(opts, presets: dict):
    """Every option left unset takes the chosen preset's value; the tag defaults to the preset."""
    for key, value in presets[opts.preset].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.tag = opts.tag or opts.preset
    return opts


def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tag", default=None, help="results file suffix (default: the preset)")
    p.add_argument("--data", default="builtin:stdlib_docs",
                   help="text for pruning calibration and the cache (its train split) and the first "
                        "held-out text (its held-out split; a local file is split by document, see "
                        f"unidistill cache-build --help); the second held-out text is {OTHER_TEXT}")
    p.add_argument("--heldout-split", default="heldout", help="split of --data evaluated on")
    p.add_argument("--variants", default=None,
                   help="runs file (default: recovery_long_variants.yaml for cpu-long, else "
                        "recovery_variants.yaml)")
    p.add_argument("--out", default="out/recovery", help="work folder (kept: reruns continue)")
    p.add_argument("--results", default=str(RESULTS))
    for key, value in PRESETS["cpu"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    opts = apply_preset(p.parse_args(argv), PRESETS)
    opts.variants = opts.variants or str(HERE / VARIANTS.get(opts.preset, "recovery_variants.yaml"))
    return opts


def main(argv=None):
    opts = parse_options(argv)
    write_results(opts, run(opts))


if __name__ == "__main__":
    main()
