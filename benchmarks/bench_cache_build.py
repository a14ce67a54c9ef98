"""cache-build throughput against a bare teacher forward on the same batches, and bytes/token.

Usage (CPU, the real SmolLM2-135M teacher over CPython's reference text):
    python benchmarks/bench_cache_build.py --device cpu --tag cpu
GPU (the tag defaults to the GPU's name, h100 / h200; a cpu tag is refused on CUDA), e.g. on a
random-weight teacher of SmolLM2-135M's shape (benchmarks/random_model.py) over more text:
    python benchmarks/bench_cache_build.py --teacher /tmp/teacher-135m --data builtin:stdlib_docs \
        --device cuda --dtype bfloat16 --seq-len 1024 --batch-size 16 --n-sequences 512

The bare forward is ``model(input_ids)`` (logits for every position, nothing kept). Timings are
interleaved: bare, build, bare, build, ..., bare (``--repeats`` builds), so each build's ratio is
taken against the bare forwards just before and after it, and a noisy machine's drift shows as the
spread of the ratios; the figures are medians with their range (``--bare-repeats`` passes over the
ids in each bare timing). Results go to benchmarks/results/cache_build_<tag>.{json,md}, with the
machine, the command, the date and the teacher's shape (and whether its weights are random).

Comparing two versions of the code on one machine: run this script from each checkout in turns
(``--results`` elsewhere), then ``--merge`` each version's JSON files into one result (their
repeats pooled) and name the earlier version's with ``--baseline`` to put it beside the later:
    python benchmarks/bench_cache_build.py --merge after1.json after2.json --baseline before.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
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


def spread(values) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def one_build(args, device, out: Path) -> dict:
    cfg = BuildConfig(teacher=args.teacher, data=args.data, split=args.split, out=str(out),
                      seq_len=args.seq_len, top_k=args.top_k, layers=args.layers,
                      max_sequences=args.n_sequences, batch_size=args.batch_size,
                      shard_size=args.shard_size, dtype=args.dtype, device=str(device))
    manifest = build_cache(cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    b = manifest["build"]
    return {"tokens_per_s": b["tokens_per_second"],
            "seconds": {k: b.get(k) for k in ("wall_seconds", "teacher_seconds", "writer_seconds",
                                               "writer_wait_seconds")},
            "writer_threads": b.get("writer_threads", 1)}


def measure(args) -> dict:
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
    bare = [bare_forward_tps(model, ids, args.batch_size, device, args.bare_repeats)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    repeats = []
    for r in range(args.repeats):
        out = work / f"cache{r}"
        build = one_build(args, device, out)
        if r == 0:
            info = cache_info(out)
        shutil.rmtree(out)
        bare.append(bare_forward_tps(model, ids, args.batch_size, device, args.bare_repeats))
        build.update(bare_before=round(bare[-2], 1), bare_after=round(bare[-1], 1),
                     ratio=round(build["tokens_per_s"] / ((bare[-2] + bare[-1]) / 2), 3))
        repeats.append(build)
        print(f"repeat {r}: bare {bare[-2]:.0f} / {bare[-1]:.0f}, build {build['tokens_per_s']:.0f} "
              f"tok/s, ratio {build['ratio']:.3f}", file=sys.stderr)
    shutil.rmtree(work)
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "command": "python " + shlex.join([sys.argv[0]] + (args.argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(device.type),
        "settings": {k: v for k, v in vars(args).items() if k not in ("results", "argv", "merge", "baseline")},
        "teacher": teacher, "note": args.note, "tokens": int(ids.size), "sequences": len(ids),
        "runs": [{"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "repeats": repeats}],
        "peak_cuda_mib_during_build": None if peak_cuda is None else round(peak_cuda, 1),
        "bytes_per_token": {k: round(v, 1) for k, v in info["bytes_per_token"].items()},
    }


def summarize(result: dict) -> dict:
    """The medians and ranges over every repeat of every run in ``result``."""
    reps = [r for run in result["runs"] for r in run["repeats"]]
    bare = [r[k] for r in reps for k in ("bare_before", "bare_after")]
    result.update(
        bare_forward_tokens_per_s=spread(bare), cache_build_tokens_per_s=spread([r["tokens_per_s"] for r in reps]),
        ratio_build_over_bare=spread([r["ratio"] for r in reps]), target_ratio_build_over_bare=TARGET_RATIO,
        build_seconds={k: spread([r["seconds"][k] for r in reps if r["seconds"].get(k) is not None])
                       for k in ("wall_seconds", "teacher_seconds", "writer_seconds", "writer_wait_seconds")
                       if any(r["seconds"].get(k) is not None for r in reps)},
        writer_threads=sorted({r.get("writer_threads", 1) for r in reps}))
    return result


def merge(paths) -> dict:
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    for r in results[1:]:
        if r["settings"] != first["settings"] or r["machine"].get("commit") != first["machine"].get("commit"):
            raise SystemExit(f"--merge: {paths[0]} and another file differ in settings or commit; "
                             "merge only runs of one version with one command")
    return {**first, "runs": [run for r in results for run in r["runs"]],
            "merged_from": [str(p) for p in paths]}


def fmt(s: dict, digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown(result: dict, baseline: dict | None) -> str:
    st, b = result["settings"], result["bytes_per_token"]
    rows = [("bare forward tokens/s", "bare_forward_tokens_per_s", 0),
            ("cache-build tokens/s", "cache_build_tokens_per_s", 0),
            (f"**ratio cache-build / bare** (target >= {TARGET_RATIO})", "ratio_build_over_bare", 3)]
    secs = [(f"build {k.replace('_', ' ')}", k, 2) for k in result["build_seconds"]]
    head = "| measure | " + ("before | after |" if baseline else "median (min-max) |")
    lines = [f"# cache-build vs bare teacher forward ({st['tag']})", "",
             f"`{result['command']}` on {result['date']}"
             + (f" ({len(result['runs'])} runs merged)" if len(result["runs"]) > 1 else ""), "",
             f"Machine: {short(result['machine'])}", "",
             f"Teacher: {describe_model(result['teacher'])}; data {st['data']} (split {st['split']}).", "",
             f"{result['tokens']} tokens ({result['sequences']} x {st['seq_len']}), batch {st['batch_size']}, "
             f"top-{st['top_k']}, layers {st['layers']}, teacher dtype {st['dtype']}; "
             f"{result['ratio_build_over_bare']['n']} builds, each between two bare-forward timings"
             + (f" of {st['bare_repeats']} passes" if st["bare_repeats"] > 1 else "")
             + f"; writer threads {', '.join(map(str, result['writer_threads']))}.", "",
             *([result["note"], ""] if result.get("note") else []),
             *(["Random weights: the teacher's distribution is near uniform, so the bytes/token below "
                "(compression) are not those of a trained teacher; the speeds are its shape's.", ""]
               if result["teacher"].get("random_weights") else []),
             *([f"Before: commit {baseline['machine'].get('commit')}, {baseline['command']}; after: "
                f"commit {result['machine'].get('commit')}. Medians (min-max) over every repeat.", ""]
               if baseline else []),
             head, "|---|---|" + ("---|" if baseline else "")]
    for label, key, digits in rows + secs:
        after = fmt(result[key], digits) if key in result else fmt(result["build_seconds"][key], digits)
        if baseline:
            src = baseline if key in baseline else baseline.get("build_seconds", {})
            before = fmt(src[key], digits) if key in src else "-"
            lines.append(f"| {label} | {before} | {after} |")
        else:
            lines.append(f"| {label} | {after} |")
    if result.get("peak_cuda_mib_during_build") is not None:
        lines.append(f"| peak CUDA MiB during the build | {result['peak_cuda_mib_during_build']:.0f} |"
                     + (" |" if baseline else ""))
    pad = " |" if baseline else ""
    lines += [f"| logits bytes/token raw / disk | {b['logits_raw']} / {b['logits_disk']} |{pad}",
              f"| hidden bytes/token raw / disk | {b['hidden_raw']} / {b['hidden_disk']} |{pad}",
              f"| total bytes/token on disk | {b['total_disk']} |{pad}", ""]
    lines += ["Every repeat (tokens/s: bare before / build / bare after, ratio):", ""]
    for label, res in ((("before", baseline), ("after", result)) if baseline else (("", result),)):
        reps = [r for run in res["runs"] for r in run["repeats"]]
        lines.append((f"- {label}: " if label else "- ") + "; ".join(
            f"{r['bare_before']:.0f} / {r['tokens_per_s']:.0f} / {r['bare_after']:.0f}, {r['ratio']:.3f}"
            for r in reps))
    return "\n".join(lines) + "\n"


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
    p.add_argument("--repeats", type=int, default=3, help="builds, each between two bare-forward timings")
    p.add_argument("--bare-repeats", type=int, default=1,
                   help="passes over the ids in each bare-forward timing (GPU: make it last seconds)")
    p.add_argument("--tag", default=None,
                   help="results name: cache_build_<tag> [default: cpu on the CPU, the GPU's name on CUDA]")
    p.add_argument("--note", default="", help="a line for the markdown (what this run is for)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: pool the repeats of these results (one version, one command)")
    p.add_argument("--baseline", metavar="JSON", help="a result (or several, comma-separated, merged) "
                   "of the code before, shown beside this one")
    args = p.parse_args(argv)
    args.argv = argv
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    result = summarize(merge(args.merge) if args.merge else measure(args))
    baseline = summarize(merge(args.baseline.split(","))) if args.baseline else None
    if baseline:
        result["baseline"] = {k: baseline[k] for k in ("command", "machine", "runs", "bare_forward_tokens_per_s",
                                                       "cache_build_tokens_per_s", "ratio_build_over_bare",
                                                       "build_seconds", "writer_threads")}
    tag = result["settings"]["tag"]
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"cache_build_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, baseline)
    (results_dir / f"cache_build_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
