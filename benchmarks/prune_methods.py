"""Starting held-out perplexity of pruned students, per pruning method, on the real teacher.

    PYTHONPATH=. python benchmarks/prune_methods.py                      # every variant
    PYTHONPATH=. python benchmarks/prune_methods.py --only depth10-kl    # a subset, merged in

Teacher ``builtin:smollm2`` (SmolLM2-135M-Instruct, fp32). Calibration: ``builtin:pydoc_topics``
train split (``--calib-sequences`` x 256 tokens; the kl/ppl block scores use the first
``--score-sequences`` of them). Held-out: its ``heldout`` split, 16 x 256 tokens. The teacher's
activation statistics are collected once and shared by every variant; each depth method is scored
once for the deepest cut and shallower cuts take the first blocks of its drop order (exact for
one-shot and iterative alike). Results: benchmarks/results/prune_methods_<tag>.{json,md}; a run
with ``--only`` updates the named rows of an existing result and keeps the others.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402  benchmarks/machine.py, beside this script

from unidistill.evaluate import evaluate_on_ids  # noqa: E402
from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source  # noqa: E402
from unidistill.pruning.depth import blocks_to_keep  # noqa: E402
from unidistill.pruning.importance import collect_stats  # noqa: E402
from unidistill.pruning.prune import count_parameters, prune_model  # noqa: E402
from unidistill.pruning.width import massive_channels  # noqa: E402
from unidistill.text.data import BUILTIN_PYDOC, iter_documents, pack_documents  # noqa: E402

DEPTHS = {  # name -> (method, iterative)
    "last": ("last", False), "cosine": ("importance", False), "cosine-iter": ("importance", True),
    "kl": ("kl", False), "kl-iter": ("kl", True), "ppl": ("ppl", False), "ppl-iter": ("ppl", True),
}
MAX_DROP = 10


def variants() -> list[tuple[str, str, int, dict]]:
    """(name, depth, blocks dropped, width options of prune_model)."""
    out = []
    for depth in DEPTHS:
        for drop in (6, MAX_DROP):
            out.append((f"depth{drop}-{depth}", depth, drop, {}))
    w = []
    for agg in ("mean", "minitron"):
        w += [(f"mlp0.67-{agg}", {"mlp_keep": 0.67, "aggregation": agg}),
              (f"heads0.67-{agg}", {"heads_keep": 0.67, "aggregation": agg}),
              (f"hidden0.78-{agg}", {"hidden_keep": 0.78, "aggregation": agg})]
    for scale in ("none", "energy", "token"):
        w.append((f"hidden0.78-norm-{scale}", {"hidden_keep": 0.78, "norm_scale": scale}))
    w.append(("hidden0.78-no-massive-guard", {"hidden_keep": 0.78, "keep_massive": False}))
    out += [(name, "cosine", 0, kw) for name, kw in w]
    # student (b): <= 55 % of the teacher's parameters, hidden 576 -> 432
    for depth in ("cosine", "kl", "kl-iter"):
        out.append((f"b24-{depth}-mlp1024-h432", depth, 6, {"mlp_keep": 0.67, "hidden_keep": 0.78}))
    for scale in ("none", "energy"):
        out.append((f"b24-kl-mlp1024-h432-norm-{scale}", "kl", 6,
                    {"mlp_keep": 0.67, "hidden_keep": 0.78, "norm_scale": scale}))
    out.append(("b24-kl-mlp1024-h432-mean", "kl", 6,
                {"mlp_keep": 0.67, "hidden_keep": 0.78, "aggregation": "mean"}))
    out.append(("b26-kl-mlp1024-h432", "kl", 4, {"mlp_keep": 0.67, "hidden_keep": 0.78}))
    out.append(("b28-kl-mlp896-h432", "kl", 2, {"mlp_keep": 0.58, "hidden_keep": 0.78}))
    out.append(("b26-kl-mlp1024-h432-heads6", "kl", 4,
                {"mlp_keep": 0.67, "hidden_keep": 0.78, "heads_keep": 0.67}))
    out.append(("b24-kl-mlp768-h504", "kl", 6, {"mlp_keep": 0.5, "hidden_keep": 0.875}))
    return out


def render(result: dict) -> str:
    teacher = result["teacher"]
    lines = [f"# Pruning methods: starting held-out perplexity ({result['machine'].get('gpu', 'CPU')})", "",
             f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
             f"Machine: {json.dumps(result['machine'])}  ",
             f"Teacher {teacher['model']}: {teacher['parameters']:,} parameters, held-out perplexity "
             f"{teacher['perplexity']:.2f} ({result['heldout_tokens']} tokens of "
             f"{BUILTIN_PYDOC} heldout). Calibration: {result['calibration_tokens']} train tokens "
             f"(block scores kl/ppl on {result['score_tokens']}). Massive-activation channels: "
             f"{result['massive_channels']}.", "",
             "| variant | blocks | heads | MLP | hidden | parameters | share | perplexity | dropped blocks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["variants"].items():
        lines.append(f"| {name} | {r['num_hidden_layers']} | {r['num_attention_heads']} | "
                     f"{r['intermediate_size']} | {r['hidden_size']} | {r['parameters']:,} | "
                     f"{r['share']:.1%} | {r['perplexity']:.1f} | {r['dropped_blocks']} |")
    lines += ["", "Depth scoring time (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result.get("depth_seconds", {}).items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--calib-sequences", type=int, default=32)
    ap.add_argument("--score-sequences", type=int, default=4)
    ap.add_argument("--heldout-sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (NAME* for a prefix)")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()

    out = Path(__file__).resolve().parent / "results" / f"prune_methods_{args.tag}"
    chosen = [v for v in variants() if args.only is None
              or any(v[0] == p or (p.endswith("*") and v[0].startswith(p[:-1])) for p in args.only)]
    previous = json.loads(out.with_suffix(".json").read_text()) if args.only and out.with_suffix(".json").exists() else {}
    source = resolve_model_source(args.model, None)
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, "float32", "cpu").eval()
    calib = pack_documents(iter_documents(BUILTIN_PYDOC, split="train"), tokenizer, args.seq_len,
                           args.calib_sequences)
    heldout = pack_documents(iter_documents(BUILTIN_PYDOC, split="heldout"), tokenizer, args.seq_len,
                             args.heldout_sequences)

    def perplexity(model) -> float:
        return evaluate_on_ids(model, heldout, batch_size=args.batch_size, device="cpu", progress=False)[1]

    total = count_parameters(teacher)
    result = {**previous, "command": "PYTHONPATH=. python " + " ".join(sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine("cpu"),
              "heldout_tokens": int(heldout.size), "calibration_tokens": int(calib.size),
              "score_tokens": int(calib[:args.score_sequences].size)}
    result.setdefault("variants", {})
    result.setdefault("depth_seconds", {})
    result.setdefault("depth_orders", {})
    if "teacher" not in result:
        result["teacher"] = {"model": args.model, "parameters": total, "perplexity": perplexity(teacher)}
    t = time.time()
    stats = collect_stats(teacher, calib, batch_size=args.batch_size, progress=False)
    result["stats_seconds"] = round(time.time() - t, 1)
    result["massive_channels"] = massive_channels(stats)
    print(f"teacher ppl {result['teacher']['perplexity']:.2f}; stats {result['stats_seconds']} s; "
          f"massive channels {result['massive_channels']}", flush=True)

    # a depth order already measured (same teacher, calibration and scores) is reused
    orders = {k: v["drop_order"] for k, v in result["depth_orders"].items()}
    for name, depth, drop, width in chosen:
        if drop and depth not in orders:
            method, iterative = DEPTHS[depth]
            t = time.time()
            _, record = blocks_to_keep(teacher, method, MAX_DROP, iterative=iterative, calib_ids=calib,
                                       score_ids=calib[:args.score_sequences],
                                       batch_size=args.batch_size, progress=False)
            n = teacher.config.num_hidden_layers
            orders[depth] = record.get("drop_order", list(range(n - MAX_DROP, n))[::-1])
            result["depth_seconds"][depth] = time.time() - t
            result["depth_orders"][depth] = {"drop_order": orders[depth],
                                             "first_round_scores": (record.get("block_scores") or [None])[0]}
            print(f"{depth}: drop order {orders[depth]} ({time.time() - t:.0f} s)", flush=True)
        dropped = sorted(orders[depth][:drop]) if drop else []
        blocks = [i for i in range(teacher.config.num_hidden_layers) if i not in dropped]
        student = copy.deepcopy(teacher)
        summary = prune_model(student, blocks=blocks, calib_ids=calib, stats=stats,
                              batch_size=args.batch_size, progress=False, **width)
        params = count_parameters(student)
        ppl = perplexity(student)
        result["variants"][name] = {
            "depth": depth, "drop": drop, "options": width, "dropped_blocks": dropped,
            "num_hidden_layers": summary["num_hidden_layers"],
            "num_attention_heads": summary["num_attention_heads"],
            "intermediate_size": summary["intermediate_size"], "hidden_size": summary["hidden_size"],
            "parameters": params, "share": params / total, "perplexity": ppl}
        print(f"{name}: {params:,} ({params / total:.1%}) ppl {ppl:.2f}", flush=True)
        del student
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(render(result))


if __name__ == "__main__":
    main()
