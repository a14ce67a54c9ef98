"""cache-build throughput against a bare teacher forward on the same batches, and bytes/token.

Usage (CPU, the real SmolLM2-135M teacher over CPython's reference text):
    python benchmarks/bench_cache_build.py --device cpu --tag cpu
GPU (the tag defaults to the GPU's name, h100 / h200; a cpu tag is refused on CUDA), e.g. on a
random-weight teacher of SmolLM2-135M's shape (benchmarks/random_model.py) over more text:
    python benchmarks/bench_cache_build.py --teacher /tmp/teacher-135m --data builtin:stdlib_docs \
        --device cuda --dtype bfloat16 --seq-len 1024 --batch-size 16 --n-sequences 512

The bare forward is ``model(input_ids)`` (logits for every position, nothing kept). It is timed
before and after the build and averaged, so drift of a noisy machine shows up as the spread of
the two (``--bare-repeats`` passes over the ids each time). Results go to
benchmarks/results/cache_build_<tag>.{json,md}, with the machine, the command, the date and the
teacher's shape (and whether its weights are random).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe_model, machine, model_info, resolve_tag, short  # benchmarks/machine.py

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


TARGET_RATIO = 0.95  # issue 15: cache-build at >= 0.95 of the bare forward's tokens/s


def bare_forward_tps(model, ids, batch_size, device, repeats: int = 1) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            for s in range(0, len(ids), batch_size):
                batch = torch.from_numpy(ids[s:s + batch_size]).long().to(device)
                model(input_ids=batch).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * ids.size / (time.perf_counter() - t0)


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
    p.add_argument("--bare-repeats", type=int, default=1,
                   help="passes over the ids in each bare-forward timing (GPU: make it last seconds)")
    p.add_argument("--tag", default=None,
                   help="results name: cache_build_<tag> [default: cpu on the CPU, the GPU's name on CUDA]")
    p.add_argument("--note", default="", help="a line for the markdown (what this run is for)")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    args.tag = resolve_tag(args.tag, device.type)
    source = resolve_model_source(args.teacher)
    tok = load_tokenizer(source)
    ids = pack_documents(iter_documents(args.data, split=args.split), tok, args.seq_len,
                         args.n_sequences)
    model = load_model(source, args.dtype, str(device))
    teacher = {**model_info(source.path, model.config),
               "parameters": sum(p.numel() for p in model.parameters())}
    bare_forward_tps(model, ids[: args.batch_size], args.batch_size, device, 2)  # warm-up
    bare_before = bare_forward_tps(model, ids, args.batch_size, device, args.bare_repeats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    out = Path(tempfile.mkdtemp(prefix="bench-cache-")) / "cache"
    cfg = BuildConfig(teacher=args.teacher, data=args.data, split=args.split, out=str(out),
                      seq_len=args.seq_len, top_k=args.top_k, layers=args.layers,
                      max_sequences=args.n_sequences, batch_size=args.batch_size,
                      shard_size=args.shard_size, dtype=args.dtype, device=str(device))
    manifest = build_cache(cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    build_tps = manifest["build"]["tokens_per_second"]
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    bare_after = bare_forward_tps(model, ids, args.batch_size, device, args.bare_repeats)
    info = cache_info(out)
    shutil.rmtree(out.parent)

    bare = (bare_before + bare_after) / 2
    result = {
        "command": "python " + shlex.join([sys.argv[0]] + (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(device.type),
        "settings": {k: v for k, v in vars(args).items() if k != "results"},
        "teacher": teacher, "note": args.note,
        "tokens": int(ids.size),
        "bare_forward_tokens_per_s": {"before": round(bare_before, 1), "after": round(bare_after, 1)},
        "cache_build_tokens_per_s": build_tps,
        "ratio_build_over_bare": round(build_tps / bare, 3),
        "target_ratio_build_over_bare": TARGET_RATIO,
        "peak_cuda_mib_during_build": None if peak_cuda is None else round(peak_cuda, 1),
        "build_seconds": {k: manifest["build"][k] for k in ("wall_seconds", "teacher_seconds", "writer_seconds")},
        "bytes_per_token": {k: round(v, 1) for k, v in info["bytes_per_token"].items()},
    }
    RESULTS_DIR = Path(args.results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"cache_build_{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    b = result["bytes_per_token"]
    md = [f"# cache-build vs bare teacher forward ({args.tag})", "",
          f"`{result['command']}` on {result['date']}", "", f"Machine: {short(result['machine'])}", "",
          f"Teacher: {describe_model(teacher)}; data {args.data} (split {args.split}).", "",
          f"{result['tokens']} tokens ({len(ids)} x {args.seq_len}), batch {args.batch_size}, "
          f"top-{args.top_k}, layers {args.layers}, teacher dtype {args.dtype}"
          + (f"; bare forward {args.bare_repeats} passes per timing" if args.bare_repeats > 1 else ""), "",
          *([args.note, ""] if args.note else []),
          *(["Random weights: the teacher's distribution is near uniform, so the bytes/token below "
             "(compression) are not those of a trained teacher; the speeds are its shape's.", ""]
            if teacher.get("random_weights") else []),
          "| measure | value |", "|---|---|",
          f"| bare forward tokens/s (before / after) | {bare_before:.0f} / {bare_after:.0f} |",
          f"| cache-build tokens/s | {build_tps:.0f} |",
          f"| **ratio cache-build / bare** (target >= {TARGET_RATIO}) | **{result['ratio_build_over_bare']:.3f}** |",
          f"| build seconds: wall / teacher / writer | {' / '.join(str(v) for v in result['build_seconds'].values())} |",
          *([f"| peak CUDA MiB during the build | {peak_cuda:.0f} |"] if peak_cuda is not None else []),
          f"| logits bytes/token raw / disk | {b['logits_raw']} / {b['logits_disk']} |",
          f"| hidden bytes/token raw / disk | {b['hidden_raw']} / {b['hidden_disk']} |",
          f"| total bytes/token on disk | {b['total_disk']} |", ""]
    (RESULTS_DIR / f"cache_build_{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
