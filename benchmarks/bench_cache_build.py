"""cache-build throughput against a bare teacher forward on the same batches, and bytes/token.

Usage (CPU, the real SmolLM2-135M teacher over CPython's reference text):
    python benchmarks/bench_cache_build.py --device cpu --tag cpu
GPU:
    python benchmarks/bench_cache_build.py --device cuda --dtype bfloat16 --seq-len 1024 \
        --batch-size 16 --n-sequences 512 --tag h100

The bare forward is ``model(input_ids)`` (logits for every position, nothing kept). It is timed
before and after the build and averaged, so drift of a noisy machine shows up as the spread of
the two. Results go to benchmarks/results/cache_build_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine  # benchmarks/machine.py, beside this script

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.models.loading import (
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_source,
)
from unidistill.storage.info import cache_info
from unidistill.text.data import iter_documents, pack_documents

RESULTS = Path(__file__).resolve().parent / "results"


def bare_forward_tps(model, ids, batch_size, device) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            batch = torch.from_numpy(ids[s:s + batch_size]).long().to(device)
            model(input_ids=batch).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ids.size / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2")
    p.add_argument("--data", default="builtin:pydoc_topics")
    p.add_argument("--split", default="all")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-sequences", type=int, default=48)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--layers", default="6,12,18,24,30")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    source = resolve_model_source(args.teacher)
    tok = load_tokenizer(source)
    ids = pack_documents(iter_documents(args.data, split=args.split), tok, args.seq_len,
                         args.n_sequences)
    model = load_model(source, args.dtype, str(device))
    bare_forward_tps(model, ids[: args.batch_size], args.batch_size, device)  # warm-up
    bare_before = bare_forward_tps(model, ids, args.batch_size, device)

    out = Path(tempfile.mkdtemp(prefix="bench-cache-")) / "cache"
    cfg = BuildConfig(teacher=args.teacher, data=args.data, split=args.split, out=str(out),
                      seq_len=args.seq_len, top_k=args.top_k, layers=args.layers,
                      max_sequences=args.n_sequences, batch_size=args.batch_size,
                      shard_size=args.shard_size, dtype=args.dtype, device=str(device))
    manifest = build_cache(cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    build_tps = manifest["build"]["tokens_per_second"]
    bare_after = bare_forward_tps(model, ids, args.batch_size, device)
    info = cache_info(out)
    shutil.rmtree(out.parent)

    bare = (bare_before + bare_after) / 2
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d"), "machine": machine(device.type),
        "settings": {k: v for k, v in vars(args).items() if k != "results"},
        "tokens": int(ids.size),
        "bare_forward_tokens_per_s": {"before": round(bare_before, 1), "after": round(bare_after, 1)},
        "cache_build_tokens_per_s": build_tps,
        "ratio_build_over_bare": round(build_tps / bare, 3),
        "build_seconds": {k: manifest["build"][k] for k in ("wall_seconds", "teacher_seconds", "writer_seconds")},
        "bytes_per_token": {k: round(v, 1) for k, v in info["bytes_per_token"].items()},
    }
    RESULTS_DIR = Path(args.results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"cache_build_{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    b = result["bytes_per_token"]
    md = [f"# cache-build vs bare teacher forward ({args.tag})", "",
          f"`{result['command']}` on {result['date']}, {json.dumps(result['machine'])}", "",
          f"{result['tokens']} tokens ({args.n_sequences} x {args.seq_len}), batch {args.batch_size}, "
          f"top-{args.top_k}, layers {args.layers}, teacher dtype {args.dtype}", "",
          "| measure | value |", "|---|---|",
          f"| bare forward tokens/s (before / after) | {bare_before:.0f} / {bare_after:.0f} |",
          f"| cache-build tokens/s | {build_tps:.0f} |",
          f"| **ratio cache-build / bare** | **{result['ratio_build_over_bare']:.3f}** |",
          f"| logits bytes/token raw / disk | {b['logits_raw']} / {b['logits_disk']} |",
          f"| hidden bytes/token raw / disk | {b['hidden_raw']} / {b['hidden_disk']} |",
          f"| total bytes/token on disk | {b['total_disk']} |", ""]
    (RESULTS_DIR / f"cache_build_{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
