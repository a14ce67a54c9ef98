"""The recovery experiment: how much of the teacher does distillation give a pruned student back,
and which part of the loss earns it?

Usage (CPU, about 55 minutes on 2 cores):
    python benchmarks/recovery.py --preset cpu
GPU (longer sequences, more steps, bf16; pass --data builtin:stdlib_docs or a file of your own for
more text than the default builtin:pydoc_topics):
    python benchmarks/recovery.py --preset gpu --tag h100

Pipeline, each stage the user-facing command:
  1. ``unidistill prune``: SmolLM2-135M-Instruct (30 blocks, hidden 576, MLP 1536) -> drop the
     last 6 blocks, MLP x0.67, hidden x0.78 (24 blocks, MLP 1024, hidden 432);
  2. ``unidistill cache-build``: one teacher cache of the training split (top-64 + tail, hidden
     states of teacher blocks 8, 15, 23, 30) and one of the held-out split;
  3. ``unidistill ablate`` with ``benchmarks/recovery_variants.yaml``: every run trains the same
     student from the same cache for the same number of steps; teacher, untrained student and
     each run are evaluated on the held-out split (never trained on);
  4. ``unidistill report``: loss curves, layer-cosine heatmaps and the recovery bars.
Results: benchmarks/results/recovery_<tag>.{json,md} and recovery_<tag>.png (the bars).

A stopped experiment continues where it stopped (the same command, the same --out). Before a
stage runs, ``--out/stages.json`` records the options it runs with; a stage is skipped only when
that record matches AND its output is complete: the pruned student is complete when its folder
exists with config and weights (prune writes it under another name and renames it when done),
a cache when its manifest says ``status: complete`` (the writer's last step). A cache stopped
mid-build with the same options is resumed; an output made with other options is rebuilt
(``--overwrite``). ``ablate`` always runs: it keeps each run and evaluation made with the same
settings (student files, cache fingerprints, variant) and redoes the rest, so a rebuilt student or
cache retrains the runs and a changed variant retrains only that run.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
PRESETS = {
    "cpu": dict(device="cpu", seq_len=256, train_sequences=96, heldout_sequences=28, batch_size=4,
                steps=24, eval_sequences=28, bf16=False),
    "gpu": dict(device="cuda", seq_len=512, train_sequences=1600, heldout_sequences=14,
                batch_size=8, steps=200, eval_sequences=14, bf16=True),
}
PRUNE = ["--drop-layers", "6", "--depth-method", "last", "--mlp-keep", "0.67", "--hidden-keep", "0.78",
         "--calib-sequences", "16"]
LAYERS = "8,15,23,30"
TOP_K = 64
STAGES_FILE = "stages.json"  # in --out: the options each stage's output is made with


def unidistill(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "unidistill"), *args]


def _execute(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def _say(message: str) -> None:
    print(message, flush=True)


def command_options(argv: list[str]) -> dict:
    """``[exe, cmd, --flag, value, --switch, ...]`` -> {"command": cmd, "--flag": value,
    "--switch": True}: what a stage's output is made with, in a form whose changes read well."""
    options, i = {"command": argv[1]}, 2
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            options[argv[i]], i = argv[i + 1], i + 2
        else:
            options[argv[i]], i = True, i + 1
    return options


def pruned_student_complete(folder: Path) -> bool:
    """prune saves into a temporary folder and renames it: a folder with config and weights is whole."""
    config = folder / "config.json"
    return (config.is_file() and "unidistill_provenance" in json.loads(config.read_text())
            and any(folder.glob("*.safetensors")))


def cache_complete(folder: Path) -> bool:
    """The writer marks a cache ``complete`` in its manifest as its very last step."""
    from unidistill.storage.manifest import STATUS_COMPLETE
    from unidistill.storage.writer import read_manifest

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


def run(opts, log: Callable[[str], None] = _say) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    student, cache, heldout_cache, runs = (out / "student", out / "cache", out / "heldout-cache",
                                           out / "runs")
    stages = Stages(out, log)
    t0 = time.perf_counter()
    stages.run("prune", unidistill(
        "prune", "--model", TEACHER, "--out", str(student), *PRUNE, "--calib-data", opts.data,
        "--device", opts.device), student, pruned_student_complete)
    build = ["--teacher", TEACHER, "--data", opts.data, "--seq-len", str(opts.seq_len), "--top-k",
             str(TOP_K), "--layers", LAYERS, "--batch-size", "8", "--device", opts.device]
    stages.run("cache_train", unidistill(
        "cache-build", *build, "--split", "train", "--out", str(cache),
        "--max-sequences", str(opts.train_sequences)), cache, cache_complete, resumable=True)
    stages.run("cache_heldout", unidistill(
        "cache-build", *build, "--split", opts.heldout_split, "--out", str(heldout_cache),
        "--max-sequences", str(opts.heldout_sequences)), heldout_cache, cache_complete, resumable=True)
    common = ["--max-steps", str(opts.steps), "--per-device-train-batch-size", str(opts.batch_size)]
    if opts.device == "cpu":
        common.append("--use-cpu")
    variants = _variants_file(opts, out)
    stages.run("ablate", unidistill(
        "ablate", "--cache", str(cache), "--student", str(student), "--teacher", TEACHER,
        "--heldout", opts.data, "--heldout-split", opts.heldout_split, "--heldout-cache",
        str(heldout_cache), "--out", str(runs), "--variants", str(variants), *common,
        "--eval-sequences", str(opts.eval_sequences), "--device", opts.device))
    stages.run("report", unidistill("report", str(runs)))
    times = {**stages.times, "total": round(time.perf_counter() - t0, 1)}
    return {"times_s": times, "table": json.loads((runs / "ablation.json").read_text()),
            "student": json.loads((student / "config.json").read_text())["unidistill_provenance"],
            "runs": runs}


def _variants_file(opts, out: Path) -> Path:
    """The variants YAML, with bf16 added to every run for the GPU preset."""
    import yaml

    spec = yaml.safe_load(Path(opts.variants).read_text())
    if opts.bf16:
        spec["common"]["bf16"] = True
    out.mkdir(parents=True, exist_ok=True)
    path = out / "variants.yaml"
    text = yaml.safe_dump(spec, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _train_seconds(runs: Path, name: str):
    path = runs / name / "train_speed.json"
    return json.loads(path.read_text()).get("train_seconds") if path.is_file() else None


def write_results(opts, result: dict) -> None:
    from unidistill.ablate import format_ratio, uniform_baseline_note

    table, times, runs = result["table"], result["times_s"], result["runs"]
    command = "python " + " ".join(sys.argv)
    prov = result["student"]
    rows = table["rows"]
    for row in rows:
        row["train_seconds"] = _train_seconds(runs, row["name"])
    out = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(opts.device),
           "settings": {k: v for k, v in vars(opts).items() if k not in ("results", "out")},
           "student": {k: prov.get(k) for k in ("dropped_blocks", "num_hidden_layers", "hidden_size",
                                               "intermediate_size", "parameters_before",
                                               "parameters_after")},
           "vocab_size": table.get("vocab_size"), "uniform_nll": table.get("uniform_nll"),
           "times_s": times, "rows": rows, "common": table["common"]}
    RESULTS_DIR = Path(opts.results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"recovery_{opts.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.copyfile(runs / "recovery.png", RESULTS_DIR / f"recovery_{opts.tag}.png")

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    minutes = {k: num(None if v is None else v / 60, ".1f") for k, v in times.items()}
    md = [f"# Recovery experiment ({opts.tag})", "",
          f"`{command}` on {out['date']}, {json.dumps(out['machine'])}", "",
          f"Teacher SmolLM2-135M-Instruct ({prov['parameters_before']:,} parameters). Student: the "
          f"teacher pruned to {prov['num_hidden_layers']} blocks, MLP {prov['intermediate_size']}, "
          f"hidden {prov['hidden_size']} ({prov['parameters_after']:,} parameters; dropped blocks "
          f"{prov['dropped_blocks']}). One cache of {opts.train_sequences} x {opts.seq_len} tokens "
          f"of `{opts.data}` (top-{TOP_K} + tail, teacher layers {LAYERS}); every run "
          f"{opts.steps} steps x {opts.batch_size} sequences; held-out: {opts.eval_sequences} x "
          f"{opts.seq_len} tokens of the `{opts.heldout_split}` split, never trained on.", "",
          "Ppl ÷ T and acc ÷ T: the run's held-out perplexity and next-token accuracy (share of "
          "positions whose most likely token is the actual next one) over the teacher's; acc ÷ T is "
          "the analogue of \"% of the teacher's benchmark score\". Gap closed % (recovery): share "
          "of the pruned student's gap to the teacher in held-out log-perplexity that the run "
          "closes. Top-1: agreement with the teacher's most likely token. KL is KL(teacher || "
          "model) at T = 1 over the cached top-64 + tail.",
          *([uniform_baseline_note(table)] if uniform_baseline_note(table) else []), "",
          "| run | α | β | γ | map | hidden loss | perplexity | ppl ÷ T | acc | acc ÷ T | gap closed % "
          "| top-1 | KL | train min |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        hidden = s.get("gamma", 0) > 0
        name = r["name"] + (" (online, full vocab)" if s.get("online") == "full" else "")
        md.append(f"| {name} | {num(s.get('alpha'), 'g')} | {num(s.get('beta'), 'g')} | "
                  f"{num(s.get('gamma'), 'g')} | {s.get('layer_map', '-') if hidden else '-'} | "
                  f"{s.get('hidden_loss', '-') if hidden else '-'} | {num(r['perplexity'], '.1f')} | "
                  f"{format_ratio(r.get('perplexity_ratio'))} | {num(r.get('accuracy'), '.3f')} | "
                  f"{format_ratio(r.get('accuracy_ratio'))} | "
                  f"{num(r['recovery_pct'], '.1f')} | {num(r['top1_agreement'], '.3f')} | "
                  f"{num(None if r['kl_to_teacher'] is None else max(r['kl_to_teacher'], 0.0), '.3f')} | "
                  f"{num(None if r['train_seconds'] is None else r['train_seconds'] / 60, '.1f')} |")
    md += ["", "Wall time (minutes): " + ", ".join(f"{k} {v}" for k, v in minutes.items()) + ".", "",
           f"![recovery](recovery_{opts.tag}.png)"]
    (RESULTS_DIR / f"recovery_{opts.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tag", default=None, help="results file suffix (default: the preset)")
    p.add_argument("--data", default="builtin:pydoc_topics",
                   help="text for pruning calibration and the cache (its train split) and for "
                        "evaluation (its held-out split; a local file is split by document, see "
                        "unidistill cache-build --help)")
    p.add_argument("--heldout-split", default="heldout")
    p.add_argument("--variants", default=str(HERE / "recovery_variants.yaml"))
    p.add_argument("--out", default="out/recovery", help="work folder (kept: reruns continue)")
    p.add_argument("--results", default=str(RESULTS))
    for key, value in PRESETS["cpu"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    opts = p.parse_args(argv)
    for key, value in PRESETS[opts.preset].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.tag = opts.tag or opts.preset
    return opts


def main(argv=None):
    opts = parse_options(argv)
    write_results(opts, run(opts))


if __name__ == "__main__":
    main()
