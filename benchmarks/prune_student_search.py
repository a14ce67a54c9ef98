"""Search for a <= 55 % depth + width student of builtin:smollm2 with a narrower hidden size whose
starting held-out perplexity (no training) is as low as possible (goal <= 300).

    PYTHONPATH=. python benchmarks/prune_student_search.py                    # every candidate
    PYTHONPATH=. python benchmarks/prune_student_search.py --only 'b26*'      # a subset, merged in

Same protocol as benchmarks/prune_methods.py: teacher fp32 on CPU, held-out = builtin:pydoc_topics
heldout, 16 x 256 tokens. Each candidate names its calibration text (``builtin:pydoc_topics`` or
``builtin:stdlib_docs``, train split, N x 256 tokens); the teacher's activation statistics are
collected once per calibration and shared. Dropped blocks follow the ``kl`` drop order that
prune_methods.py measured (one-shot drop-one KL on the first 4 pydoc calibration sequences:
14, 25, 12, 5, 17, 3, ...), which is what ``unidistill prune --depth-method kl`` computes on pydoc
calibration (its first 4 sequences are the same for 16, 32 or 64 sequences).
Results: benchmarks/results/prune_student_search_<tag>.{json,md}.
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

from machine import machine  # noqa: E402

from unidistill.evaluate import evaluate_on_ids  # noqa: E402
from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source  # noqa: E402
from unidistill.pruning.importance import collect_stats  # noqa: E402
from unidistill.pruning.prune import count_parameters, prune_model  # noqa: E402
from unidistill.text.data import BUILTIN_PYDOC, iter_documents, pack_documents  # noqa: E402

KL_ORDER = [14, 25, 12, 5, 17, 3, 7, 26, 4, 13]  # prune_methods_cpu.json depth_orders.kl
TEACHER_PARAMS, TEACHER_PPL = 134_515_008, 17.454060014385348  # prune_methods_cpu.json
PYDOC, STDLIB = BUILTIN_PYDOC, "builtin:stdlib_docs"


def candidates() -> list[tuple[str, int, dict, tuple[str, int]]]:
    """(name, blocks dropped (kl order), prune_model width options, (calibration data, sequences))."""
    c32 = (PYDOC, 32)
    out = [
        ("b26-mlp1024-h432-energy", 4, {"mlp_keep": 0.67, "hidden_keep": 0.78}, c32),
        ("b26-mlp1024-h432-token", 4, {"mlp_keep": 0.67, "hidden_keep": 0.78, "norm_scale": "token"}, c32),
        ("b28-mlp896-h432", 2, {"mlp_keep": 0.6, "hidden_keep": 0.78}, c32),
        ("b30-mlp832-h432", 0, {"mlp_keep": 0.54, "hidden_keep": 0.78}, c32),
        ("b24-mlp832-h504", 6, {"mlp_keep": 0.54, "hidden_keep": 0.83}, c32),
        ("b25-mlp768-h504", 5, {"mlp_keep": 0.5, "hidden_keep": 0.83}, c32),
        ("b26-mlp704-h504", 4, {"mlp_keep": 0.46, "hidden_keep": 0.83}, c32),
        ("b28-mlp640-h504", 2, {"mlp_keep": 0.42, "hidden_keep": 0.83}, c32),
    ]
    # the same students with the plain mean |activation| aggregation, more / other calibration text
    for name, drop, kw, _ in list(out):
        if name.endswith("-token"):
            continue
        out.append((name + "-mean", drop, {**kw, "aggregation": "mean"}, c32))
        out.append((name + "-calib64", drop, kw, (PYDOC, 64)))
        out.append((name + "-stdlib64", drop, kw, (STDLIB, 64)))
        out.append((name + "-mean-calib64", drop, {**kw, "aggregation": "mean"}, (PYDOC, 64)))
    return out


def render(result: dict) -> str:
    lines = ["# Starting perplexity of <= 55 % students with a narrower hidden size (CPU)", "",
             f"Command: `{result['command']}` (rows merged from several `--only` runs: see the JSON)  ",
             f"Date: {result['date']}  ", f"Machine: {json.dumps(result['machine'])}  ",
             f"Teacher builtin:smollm2: {TEACHER_PARAMS:,} parameters, held-out perplexity {TEACHER_PPL:.2f} "
             f"({result['heldout_tokens']} tokens of {PYDOC} heldout). Blocks dropped in the kl order "
             f"{KL_ORDER}.", "",
             "| candidate | blocks | MLP | hidden | aggregation | norm scale | calibration | parameters | share | perplexity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(result["variants"].items(), key=lambda kv: kv[1]["perplexity"]):
        o = r["options"]
        lines.append(f"| {name} | {r['num_hidden_layers']} | {r['intermediate_size']} | {r['hidden_size']} | "
                     f"{o.get('aggregation', 'minitron')} | {o.get('norm_scale', 'energy')} | "
                     f"{r['calib_data']} x{r['calib_sequences']} | {r['parameters']:,} | {r['share']:.1%} | "
                     f"{r['perplexity']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="candidate names (NAME* for a prefix)")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    chosen = [v for v in candidates() if args.only is None
              or any(v[0] == p or (p.endswith("*") and v[0].startswith(p[:-1])) for p in args.only)]
    if args.list:
        print("\n".join(v[0] for v in chosen))
        return
    out = Path(__file__).resolve().parent / "results" / f"prune_student_search_{args.tag}"
    result = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    source = resolve_model_source("builtin:smollm2", None)
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, "float32", "cpu").eval()
    assert count_parameters(teacher) == TEACHER_PARAMS
    heldout = pack_documents(iter_documents(PYDOC, split="heldout"), tokenizer, 256, 16)
    result.update(command="PYTHONPATH=. python " + " ".join(sys.argv),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine("cpu"),
                  heldout_tokens=int(heldout.size))
    result.setdefault("variants", {})
    calib_cache: dict = {}
    for name, drop, width, (data, nseq) in chosen:
        if (data, nseq) not in calib_cache:
            t = time.time()
            calib = pack_documents(iter_documents(data, split="train"), tokenizer, 256, nseq)
            stats = collect_stats(teacher, calib, batch_size=4, progress=False)
            calib_cache = {(data, nseq): (calib, stats)}  # one at a time: keep memory down
            print(f"calibration {data} x{len(calib)}: stats {time.time() - t:.0f} s", flush=True)
        calib, stats = calib_cache[(data, nseq)]
        t = time.time()
        dropped = sorted(KL_ORDER[:drop])
        blocks = [i for i in range(teacher.config.num_hidden_layers) if i not in dropped]
        student = copy.deepcopy(teacher)
        summary = prune_model(student, blocks=blocks, calib_ids=calib, stats=stats, batch_size=4,
                              progress=False, **width)
        params = count_parameters(student)
        ppl = evaluate_on_ids(student, heldout, batch_size=4, device="cpu", progress=False)[1]
        result["variants"][name] = {
            "drop": drop, "dropped_blocks": dropped, "options": width, "calib_data": data,
            "calib_sequences": int(len(calib)), "num_hidden_layers": summary["num_hidden_layers"],
            "intermediate_size": summary["intermediate_size"], "hidden_size": summary["hidden_size"],
            "parameters": params, "share": params / TEACHER_PARAMS, "perplexity": ppl,
            "seconds": round(time.time() - t, 1)}
        print(f"{name}: {params:,} ({params / TEACHER_PARAMS:.1%}) ppl {ppl:.1f} ({time.time() - t:.0f} s)",
              flush=True)
        del student
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(render(result))


if __name__ == "__main__":
    main()
