"""Distilling conversations: plain CE, KD on the reference answers, sequence-level KD on the
teacher's own answers (built offline with ``cache-build --generate``) and their mix, on held-out
conversations.

Usage (CPU, 2 cores; the wall time of the last run is in the results file):
    python benchmarks/chat_kd.py --preset cpu

Pipeline, each stage the user-facing command:
  0. The conversations: the first ``--train-conversations`` of ``builtin:python_qa``'s train split
     and the first ``--heldout-conversations`` of its held-out split (questions about the standard
     library's API and the language reference, answered with the docstrings' and sections' prose),
     written to ``--out/{train,heldout}.jsonl`` so that the reference caches and the generated
     caches hold the same conversations (``--split all`` of those files).
  1. ``unidistill prune --drop-layers 10 --depth-method kl`` from SmolLM2-135M-Instruct (20 blocks;
     the recovery experiment's depth student): it keeps the teacher's tokenizer and chat template.
  2. ``unidistill cache-build`` (top-64 + tail, no hidden states) four times:
     R  = the train conversations, packed by document, assistant tokens as targets;
     G  = their prompts (everything before the last assistant message) answered by the teacher
          with ``--generate`` (greedy), one conversation per row;
     HR = the held-out conversations (reference answers), as R;
     HG = the held-out prompts answered by the teacher, as G.
  3. ``unidistill distill-from-cache`` per run, the same learning rate, schedule and batch; each run
     sees every training conversation twice (R's 2 epochs, G's 2 epochs, or one epoch of each):
        ce-ref    α 1, β 0 on R         (fine-tuning on the reference answers)
        kd-ref    α 0, β 1 on R         (word-level KD along the reference answers)
        seqkd-ce  α 1, β 0 on G         (Kim and Rush's sequence-level KD)
        seqkd-kd  α 0, β 1 on G         (word-level KD along the teacher's own answers)
        mix       α 0, β 1 on R then G  (both caches concatenated; one epoch each)
     The runs in ``REPEATS`` are trained again with seed 1 for the spread.
  4. ``unidistill evaluate --cache`` of the teacher, the untrained student and every run on HR and
     HG: perplexity on the held-out assistant tokens, top-1 agreement with the teacher and
     KL(teacher || model) at T = 1, over the same (assistant) positions.
  5. ``unidistill generate --messages-field messages`` on three held-out conversations: the teacher,
     the student before and each seed-0 run, greedy.

Results: benchmarks/results/chat_kd_<tag>.{json,md}. A stopped experiment continues where it
stopped (the same command and --out; see recovery.py's ``Stages``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine  # noqa: E402
from recovery import (  # noqa: E402
    Stages, apply_preset, cache_complete, pruned_student_complete, unidistill,
)

RESULTS = HERE / "results"
TEACHER = "builtin:smollm2"
DATA = "builtin:python_qa"
PRUNE = ["--drop-layers", "10", "--depth-method", "kl"]
CALIB_DATA = "builtin:stdlib_docs"
TOP_K = 64
PRESETS = {
    "cpu": dict(device="cpu", seq_len=320, train_conversations=96, heldout_conversations=32,
                max_new_tokens=96, build_batch_size=16, batch_size=4, calib_sequences=32,
                learning_rate=3e-4),
}
# name -> (alpha, beta, caches, epochs): every run sees each training conversation twice
RUNS = {
    "ce-ref": (1.0, 0.0, ["R"], 2),
    "kd-ref": (0.0, 1.0, ["R"], 2),
    "seqkd-ce": (1.0, 0.0, ["G"], 2),
    "seqkd-kd": (0.0, 1.0, ["G"], 2),
    "mix": (0.0, 1.0, ["R", "G"], 1),
}
REPEATS = ("ce-ref", "kd-ref", "seqkd-kd")  # trained again with seed 1: the seed spread
SEED_SUFFIX = ".seed1"
HELDOUT = ("HR", "HG")
REFERENCE_ROWS = ("teacher", "student (before)")
METRICS = ("cache_perplexity", "top1_agreement", "kl_to_teacher")


def write_conversations(path: Path, split: str, n: int) -> int:
    """The first ``n`` conversations of ``DATA``'s ``split`` as JSON lines ``{"messages": [...]}``;
    rewritten only when they differ (so a rerun keeps the caches made from them)."""
    from itertools import islice

    from unidistill.text.data import iter_conversations

    rows = [json.dumps({"messages": m}, ensure_ascii=False)
            for m in islice(iter_conversations(DATA, split=split), n)]
    text = "\n".join(rows) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return len(rows)


def run_order() -> list[tuple[str, int]]:
    """(run, seed): those on the reference cache alone first, so they need no generated cache."""
    runs = [(n, 0) for n in RUNS] + [(n, 1) for n in REPEATS]
    return sorted(runs, key=lambda r: RUNS[r[0]][2] != ["R"])


def table_order() -> list[str]:
    """Run labels as the table lists them: each recipe, its seed-1 repeat after it."""
    return [label for n in RUNS for label in (n, *([n + SEED_SUFFIX] if n in REPEATS else []))]


def model_complete(folder: Path) -> bool:
    """distill-from-cache writes the final model folder last: config and weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def eval_complete(path: Path) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("cache_perplexity") is not None


def run(opts) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    t0 = time.perf_counter()
    counts = {"train": write_conversations(out / "train.jsonl", "train", opts.train_conversations),
              "heldout": write_conversations(out / "heldout.jsonl", "heldout",
                                             opts.heldout_conversations)}
    student = out / "student"
    stages.run("prune", unidistill(
        "prune", "--model", TEACHER, "--out", str(student), *PRUNE, "--calib-data", CALIB_DATA,
        "--calib-sequences", str(opts.calib_sequences), "--device", opts.device),
        student, pruned_student_complete)
    common = ["--teacher", TEACHER, "--seq-len", str(opts.seq_len), "--logits", "topk", "--top-k",
              str(TOP_K), "--layers", "none", "--batch-size", str(opts.build_batch_size),
              "--device", opts.device, "--quiet", "--split", "all", "--messages-field", "messages"]
    reference = ["--packing", "documents", "--train-on", "assistant"]
    generated = ["--generate", "--max-new-tokens", str(opts.max_new_tokens)]
    caches = {"R": ("train", reference), "HR": ("heldout", reference),
              "G": ("train", generated), "HG": ("heldout", generated)}

    def cache(name: str) -> str:
        """The cache ``name``, built (or continued) the first time a stage needs it: the runs on
        the reference caches need no generation."""
        split, options = caches[name]
        if f"cache_{name}" in stages.times:  # checked (and made) once per invocation
            return str(out / f"cache-{name}")
        stages.run(f"cache_{name}", unidistill(
            "cache-build", *common, "--data", str(out / f"{split}.jsonl"), *options,
            "--out", str(out / f"cache-{name}")), out / f"cache-{name}", cache_complete,
            resumable=True)
        return str(out / f"cache-{name}")

    models = {"teacher": TEACHER, "student (before)": str(student)}
    for name, seed in run_order():
        alpha, beta, sources, epochs = RUNS[name]
        label = name + (SEED_SUFFIX if seed else "")
        folder = out / "runs" / label
        argv = ["distill-from-cache", "--student", str(student), "--out", str(folder),
                "--alpha", str(alpha), "--beta", str(beta), "--num-train-epochs", str(epochs),
                "--per-device-train-batch-size", str(opts.batch_size),
                "--learning-rate", str(opts.learning_rate), "--seed", str(seed),
                "--data-seed", str(seed), "--save-strategy", "no", "--report-to", "none"]
        for source in sources:
            argv += ["--cache", cache(source)]
        if opts.device == "cpu":
            argv.append("--use-cpu")
        stages.run(f"run_{label}", unidistill(*argv), folder, model_complete)
        models[label] = str(folder)
    models = {label: models[label] for label in [*REFERENCE_ROWS, *table_order()]}
    evaluations: dict = {}
    for label, model in models.items():
        for held in HELDOUT:
            path = out / "eval" / f"{label.replace(' ', '_')}.{held}.json"
            path.parent.mkdir(exist_ok=True)
            stages.run(f"eval_{label}_{held}", unidistill(
                "evaluate", "--model", model, "--cache", cache(held),
                "--max-sequences", "0", "--batch-size", "8", "--device", opts.device,
                "--output", str(path)), path, eval_complete)
            evaluations.setdefault(label, {})[held] = json.loads(path.read_text())
    side = out / "side_by_side.txt"
    specs = [f"{label}={model}" for label, model in models.items()
             if not label.endswith(SEED_SUFFIX)]
    argv = unidistill("generate", *[a for s in specs for a in ("--model", s)], "--data",
                      str(out / "heldout.jsonl"), "--split", "all", "--messages-field", "messages",
                      "--n-prompts", "3", "--max-new-tokens", "64", "--device", opts.device)
    retrained = any(v is not None for k, v in stages.times.items() if k.startswith("run_"))
    if not side.is_file() or retrained or stages.recorded.get("side_by_side") != argv:
        print(f"[side_by_side] {' '.join(argv)}", flush=True)
        text = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        side.write_text(text)
        stages.recorded["side_by_side"] = argv
        stages.path.write_text(json.dumps(stages.recorded, indent=2) + "\n")
    total = round(time.perf_counter() - t0, 1)
    skipped = any(v is None for v in stages.times.values())  # then the total is of no whole run
    return {"times_s": {**stages.times, "total": None if skipped else total},
            "conversations": counts, "evaluations": evaluations,
            "caches": {name: cache_summary(out / f"cache-{name}") for name in caches},
            "side_by_side": side.read_text()}


def cache_summary(folder: Path) -> dict:
    """Rows, tokens and trained (target) tokens of a cache, from its manifest."""
    from unidistill.storage.manifest import read_manifest

    manifest = read_manifest(folder)
    build = manifest.get("build", {})
    return {"sequences": manifest["layout"]["n_sequences"], "seq_len": manifest["layout"]["seq_len"],
            "tokens": build.get("tokens"), "generation": manifest["settings"].get("generation"),
            "generation_check": build.get("generation")}


# ---- the analysis ------------------------------------------------------------------------------

def seed_spread(evaluations: dict) -> dict:
    """|metric seed 0 - seed 1| per repeated run, held-out set and metric, and the max over runs."""
    per_run = {name: {h: {m: abs(evaluations[name][h][m] - evaluations[name + SEED_SUFFIX][h][m])
                          for m in METRICS} for h in HELDOUT}
               for name in REPEATS if name + SEED_SUFFIX in evaluations}
    spread = {h: {m: max((d[h][m] for d in per_run.values()), default=None) for m in METRICS}
              for h in HELDOUT}
    return {"per_run": per_run, "max": spread}


def compare(evaluations: dict, a: str, b: str, held: str, metric: str, spread: dict) -> dict:
    """b minus a on one metric, and whether it exceeds the seed spread (twice it counts as clear)."""
    diff = evaluations[b][held][metric] - evaluations[a][held][metric]
    noise = spread["max"][held][metric]
    return {"which": f"{b} − {a}, {held} {metric}", "difference": diff, "spread": noise,
            "measurable": noise is not None and abs(diff) > noise,
            "clear": noise is not None and abs(diff) > 2 * noise}


def readings(evaluations: dict, spread: dict) -> dict:
    """The questions of the design (section 4.6), answered from the table."""
    return {
        "kd_vs_ce_on_reference_answers": compare(evaluations, "ce-ref", "kd-ref", "HR",
                                                 "cache_perplexity", spread),
        "seqkd_vs_kd_ref_on_HR_perplexity": compare(evaluations, "kd-ref", "seqkd-kd", "HR",
                                                    "cache_perplexity", spread),
        "seqkd_vs_kd_ref_on_HG_agreement": compare(evaluations, "kd-ref", "seqkd-kd", "HG",
                                                   "top1_agreement", spread),
        "mix_vs_kd_ref_on_HR_perplexity": compare(evaluations, "kd-ref", "mix", "HR",
                                                  "cache_perplexity", spread),
        "mix_vs_seqkd_kd_on_HG_perplexity": compare(evaluations, "seqkd-kd", "mix", "HG",
                                                    "cache_perplexity", spread),
    }


def write_results(opts, result: dict) -> None:
    command = "python " + " ".join(sys.argv)
    spread = seed_spread(result["evaluations"])
    out = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(opts.device),
           "settings": {k: v for k, v in vars(opts).items() if k not in ("results", "out")},
           "runs": {n: {"alpha": a, "beta": b, "caches": c, "epochs": e}
                    for n, (a, b, c, e) in RUNS.items()},
           "repeats_with_seed_1": list(REPEATS), **result, "seed_spread": spread,
           "readings": readings(result["evaluations"], spread)}
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    previous = results / f"chat_kd_{opts.tag}.json"
    if previous.is_file():  # a stage this invocation skipped keeps the time of the one that ran it
        before = json.loads(previous.read_text()).get("times_s", {})
        out["times_s"] = {k: before.get(k) if v is None and k != "total" else v
                          for k, v in out["times_s"].items()}
    (results / f"chat_kd_{opts.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(opts, out)
    (results / f"chat_kd_{opts.tag}.md").write_text(md)
    print(md)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(opts, out: dict) -> str:
    ev, spread = out["evaluations"], out["seed_spread"]
    lines = [f"# Distilling conversations ({opts.tag})", "",
             f"`{out['command']}` on {out['date']}, {json.dumps(out['machine'])}", "",
             f"Teacher SmolLM2-135M-Instruct; student `unidistill prune {' '.join(PRUNE)}` (20 "
             f"blocks). Training conversations: the first {out['conversations']['train']} of "
             f"`{DATA}` (train split); held-out: the first {out['conversations']['heldout']} of its "
             f"held-out split. Caches: top-{TOP_K} + tail, {opts.seq_len} tokens per row; G and HG "
             f"hold the teacher's greedy answers (at most {opts.max_new_tokens} new tokens). Every "
             f"run: learning rate {opts.learning_rate}, batch {opts.batch_size}, each training "
             "conversation seen twice.", "", "| cache | rows | tokens |", "|---|---|---|"]
    for name, c in out["caches"].items():
        lines.append(f"| {name} | {c['sequences']} | {json.dumps(c['tokens'])} |")
    lines += ["", "Ppl: perplexity on the held-out assistant tokens (HR: the reference answers; HG: "
              "the teacher's own answers). Top-1: agreement with the teacher's most likely token. "
              "KL: KL(teacher || model) at T = 1 over the cached top-64 + tail, at the same "
              "positions.", "",
              "| model | α | β | caches | HR ppl | HR top-1 | HR KL | HG ppl | HG top-1 | HG KL |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, e in ev.items():
        run = out["runs"].get(label.removesuffix(SEED_SUFFIX))
        cells = [label] + (["-", "-", "-"] if run is None else
                           [_num(run["alpha"], "g"), _num(run["beta"], "g"), "+".join(run["caches"])])
        for held in HELDOUT:
            m = e[held]
            cells += [_num(m["cache_perplexity"], ".2f"), _num(m["top1_agreement"], ".3f"),
                      _num(None if m["kl_to_teacher"] is None else max(m["kl_to_teacher"], 0.0), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seed spread (max over " + ", ".join(out["repeats_with_seed_1"]) + " of |seed 0 − "
              "seed 1|): " + "; ".join(f"{h} " + ", ".join(f"{m} {_num(spread['max'][h][m], '.3f')}"
                                                           for m in METRICS) for h in HELDOUT) + ".",
              "", "Readings (a difference within the seed spread is no measurable difference):"]
    for question, r in out["readings"].items():
        verdict = ("clear (more than twice the spread)" if r["clear"] else
                   "measurable (more than the spread)" if r["measurable"] else
                   "no measurable difference")
        lines.append(f"- {question.replace('_', ' ')}: {r['which']} = {r['difference']:+.3f} ({verdict}; spread "
                     f"{_num(r['spread'], '.3f')})")
    lines += ["", "## Side by side (greedy, 64 new tokens)", ""]
    lines.append("```")
    lines.append(out["side_by_side"].rstrip())
    lines.append("```")
    minutes = ", ".join(f"{k} {_num(None if v is None else v / 60, '.1f')}"
                        for k, v in out["times_s"].items())
    lines += ["", f"Wall time (minutes) of each stage, in the invocation that ran it ('-': run by an "
              f"invocation before the results file existed; 2 cores shared with the test suite): "
              f"{minutes}."]
    return "\n".join(lines) + "\n"


def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tag", default=None, help="results file suffix (default: the preset)")
    p.add_argument("--out", default="out/chat_kd", help="work folder (kept: reruns continue)")
    p.add_argument("--results", default=str(RESULTS))
    for key, value in PRESETS["cpu"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    return apply_preset(p.parse_args(argv), PRESETS)


def main(argv=None):
    opts = parse_options(argv)
    write_results(opts, run(opts))


if __name__ == "__main__":
    main()
