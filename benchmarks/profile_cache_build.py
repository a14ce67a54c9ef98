"""Where a cache build's time goes: the teacher's thread (torch.profiler) and the writer side
(cProfile in every other thread), then the writer alone on the build's own data.

Usage (CPU, the same build as ``bench_cache_build.py``'s defaults):
    python benchmarks/profile_cache_build.py --device cpu --tag cpu --label after

Four parts, written to benchmarks/results/cache_build_profile_<tag>-<label>.{json,md}:

0. **The teacher alone**: the bare forward (``model(ids).logits``, as bench_cache_build times it)
   against the build's teacher step (``TeacherRunner`` on the same batches: forward, top-k + tail,
   storage casts, copies to the host), no writer, interleaved ``--teacher-repeats`` times, then
   one pass of each under torch.profiler: the cost of the teacher step before any storage.
1. **One build, instrumented from outside** (nothing in unidistill is changed for it, so the same
   script profiles an older checkout on ``PYTHONPATH``): the main thread's seconds in the teacher
   forward (``HookedTeacher.forward``), the logit and hidden encodes (top-k + tail, casts and
   device-to-host copies, ``LogitCodec.encode`` / ``HiddenCodec.encode``) and waiting for the
   writer queue; its torch ops (``torch.profiler``, self CPU time); every other thread (writer
   threads, Zarr's event loop and its worker threads) under cProfile, its own time grouped by
   what it does (Blosc, crc32c, sha256 digests, array copies, fsync, file writes, Zarr and asyncio
   Python, idle waits). cProfile slows Python-heavy code more than C calls, so the Python share
   is an upper bound.
2. **The writer alone**: the build's first unit written again and again into a fresh cache, by
   1 and by 2 threads (``--writer-threads``), in MB/s of raw arrays; no teacher competes.
3. **Per-byte costs** of each step on that unit, single-threaded: what a writer core can do.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from machine import machine, resolve_tag, short  # benchmarks/machine.py

import unidistill.cache_builder.build as build_module
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.models.teacher import HookedTeacher
from unidistill.storage.codecs import hidden as hidden_codecs
from unidistill.storage.codecs.base import LogitCodec
from unidistill.storage.writer import CacheWriter

RESULTS = Path(__file__).resolve().parent / "results"

# cProfile entries (own time) -> what they do. Matched in order on "file:function".
GROUPS = [
    ("idle (waiting for work or results)", ("acquire' of '_thread.lock", "poll' of 'select.",
                                            "'get' of '_queue.SimpleQueue'", "threading.py(wait)",
                                            "queue.py(get)", "{method 'control' of")),
    ("Blosc compression (numcodecs)", ("numcodecs.blosc", "of 'numcodecs", "blosc")),
    ("crc32c", ("google_crc32c", "crc32c")),
    ("sha256 digests", ("_hashlib", "hashlib")),
    ("Zarr's empty-chunk check (array_equal with the fill value)", ("numeric.py(array_equal)",)),
    ("array copies (tobytes, concatenate)", ("'tobytes'", "concatenate", "'copy' of", "ascontiguousarray",
                                             "numpy.array", "frombuffer", "'join' of 'bytes'")),
    ("fsync", ("posix.fsync",)),
    ("file writes, renames, opens", ("posix.replace", "posix.rename", "posix.open", "'write' of",
                                     "posix.write", "'close' of", "posix.close", "posix.mkdir",
                                     "posix.stat", "posix.unlink", "io.open", "posix.lstat")),
    ("zarr Python (sharding, indexing, buffers)", ("/zarr/", "/donfig/")),
    ("numpy Python (shard index, fill checks)", ("/numpy/",)),
    ("asyncio / futures / thread glue", ("/asyncio/", "concurrent/futures", "threading.py", "_asyncio",
                                         "'send' of '_socket", "'put' of '_queue", "_contextvars",
                                         "_weakrefset", "'run' of")),
]


def group_of(key: str) -> str:
    for name, needles in GROUPS:
        if any(n in key for n in needles):
            return name
    return "other Python"


class ThreadProfiles:
    """cProfile in every thread started after :meth:`start` (threading.setprofile bootstraps one
    profiler per thread on its first event)."""

    def __init__(self):
        self.profiles: list[tuple[str, cProfile.Profile]] = []
        self._lock = threading.Lock()

    def _boot(self, frame, event, arg):
        p = cProfile.Profile()
        with self._lock:
            self.profiles.append((threading.current_thread().name, p))
        p.enable()

    def start(self):
        threading.setprofile(self._boot)

    def stop(self):
        threading.setprofile(None)

    def grouped(self) -> tuple[dict, dict]:
        """({group: own seconds}, {thread-name kind: own seconds}) over every profiled thread."""
        groups, threads = defaultdict(float), defaultdict(float)
        for name, p in self.profiles:
            for (file, line, func), (_cc, _nc, tottime, _ct, _callers) in p.getstats_dict().items():
                key = f"{file}({func})" if file != "~" else func
                groups[group_of(key)] += tottime
                threads[name.split("_")[0].rstrip("-0123456789")] += tottime
        return dict(groups), dict(threads)


def _getstats_dict(self):
    import pstats
    return pstats.Stats(self).stats


cProfile.Profile.getstats_dict = _getstats_dict


class PhaseTimers:
    """Seconds the main thread spends in the wrapped methods (installed by patching classes)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._undo = []
        self.first_unit = None

    def wrap(self, owner, name, label, main_only=True):
        real = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            if main_only and threading.current_thread() is not threading.main_thread():
                return real(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                timers.seconds[label] += time.perf_counter() - t0
        setattr(owner, name, timed)
        self._undo.append((owner, name, real))

    def stash_first_unit(self, owner, name):
        """Keep a copy of the first unit submitted to the writer (the writer-alone part)."""
        real = getattr(owner, name)
        timers = self

        def stash(self_, unit, arrays, *a, **kw):
            if timers.first_unit is None:
                timers.first_unit = {k: np.array(v, copy=True) for k, v in arrays.items()}
            return real(self_, unit, arrays, *a, **kw)
        setattr(owner, name, stash)
        self._undo.append((owner, name, real))

    def undo(self):
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)


def _writer_class():
    for name in ("UnitWriters", "UnitWriterThread"):
        if hasattr(build_module, name):
            return getattr(build_module, name)
    raise SystemExit("no writer class found in unidistill.cache_builder.build")


def profile_build(cfg: BuildConfig) -> dict:
    timers = PhaseTimers()
    timers.wrap(HookedTeacher, "forward", "teacher forward")
    logit_classes = {c for c in _subclasses(LogitCodec) if "encode" in vars(c)}
    for c in logit_classes:
        timers.wrap(c, "encode", "logits encode (top-k + tail, casts, copy to host)")
    for c in _subclasses(hidden_codecs.HiddenCodec):
        if "encode" in vars(c):
            timers.wrap(c, "encode", "hidden encode (casts, copy to host)")
    timers.wrap(_writer_class(), "submit", "waiting for the writer queue")
    timers.stash_first_unit(CacheWriter, "write_unit")
    threads = ThreadProfiles()
    threads.start()
    t0 = time.perf_counter()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            manifest = build_cache(cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    finally:
        threads.stop()
        timers.undo()
    total = time.perf_counter() - t0
    groups, by_thread = threads.grouped()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    build = manifest["build"]
    return {"build": {k: build[k] for k in ("wall_seconds", "teacher_seconds", "writer_seconds",
                                            "tokens_per_second")},
            "process_seconds_incl_load": round(total, 2),
            "main_thread_seconds": {k: round(v, 3) for k, v in timers.seconds.items()},
            "torch_ops_self_cpu_seconds": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in ops[:15]},
            "torch_ops_total_self_cpu_seconds": round(sum(e.self_cpu_time_total for e in ops) / 1e6, 3),
            "other_threads_own_seconds": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda x: -x[1])},
            "other_threads_by_kind": {k: round(v, 3) for k, v in sorted(by_thread.items(), key=lambda x: -x[1])},
            "writer_threads_seen": sorted({n for n, _ in threads.profiles}),
            }, timers.first_unit


def _subclasses(cls):
    out, todo = set(), [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out | {cls}


def _ops(fn) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"total": round(sum(e.self_cpu_time_total for e in ops) / 1e6, 3),
            "top": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in ops[:12]}}


def teacher_alone(cfg: BuildConfig, repeats: int) -> dict:
    """tokens/s of the bare forward and of the build's teacher step, interleaved; their ops."""
    import statistics

    from bench_cache_build import bare_forward_tps

    from unidistill.cache_builder.capture import TeacherRunner
    from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source
    from unidistill.storage.layout import index_dtype_for
    from unidistill.text.data import iter_documents, pack_documents

    source = resolve_model_source(cfg.teacher)
    ids = pack_documents(iter_documents(cfg.data, split=cfg.split), load_tokenizer(source),
                         cfg.seq_len, cfg.max_sequences)
    model = load_model(source, cfg.dtype, cfg.device)
    device = torch.device(cfg.device)
    runner = TeacherRunner(model, cfg.resolve_layers(model.config.num_hidden_layers), cfg.stored_k,
                           index_dtype=index_dtype_for(model.config.vocab_size),
                           hidden_dtype=cfg.hidden_dtype, mode=cfg.logits,
                           tail_temperatures=cfg.tail_temperatures)

    def run_teacher():
        for s in range(0, len(ids), cfg.batch_size):
            runner(ids[s:s + cfg.batch_size])

    def teacher_tps():
        t0 = time.perf_counter()
        run_teacher()
        return ids.size / (time.perf_counter() - t0)

    def parts_seconds() -> dict:
        """The teacher step cut in parts, batch by batch: forward, the head alone (what the bare
        forward also computes), the whole logit encode (head + top-k + tail), the hidden encode."""
        secs = defaultdict(float)

        def timed(label, fn, *a):
            t0 = time.perf_counter()
            out = fn(*a)
            secs[label] += time.perf_counter() - t0
            return out

        with torch.inference_mode():
            for s in range(0, len(ids), cfg.batch_size):
                batch = torch.from_numpy(ids[s:s + cfg.batch_size]).long().to(device)
                final, captured = timed("forward (blocks + final norm)", runner.forward, batch)
                rows = final.reshape(-1, final.shape[-1])
                timed("head alone (chunked, fp32 logits)", lambda: [
                    runner.logits(rows[i:i + runner.rows_per_chunk])
                    for i in range(0, rows.shape[0], runner.rows_per_chunk)])
                timed("logit encode (head + top-k + tail + casts, copy)", runner.logit_codec.encode,
                      runner, final, 0)
                for j in runner.layers:
                    timed("hidden encode (casts, copy)", runner.hidden_codec.encode, j, captured[j])
        return secs

    bare_forward_tps(model, ids[:cfg.batch_size], cfg.batch_size, device, 1)  # warm-up
    bare, step, parts = [], [], []
    for _ in range(repeats):
        bare.append(bare_forward_tps(model, ids, cfg.batch_size, device))
        step.append(teacher_tps())
        parts.append(parts_seconds())
    ratios = [t / b for t, b in zip(step, bare)]
    median_parts = {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}
    out = {"bare_tokens_per_s": [round(x, 1) for x in bare], "teacher_step_tokens_per_s": [round(x, 1) for x in step],
           "ratio_step_over_bare": [round(r, 3) for r in ratios],
           "median_ratio": round(statistics.median(ratios), 3),
           "parts_seconds_median": median_parts,
           "parts_seconds": [{k: round(v, 3) for k, v in p.items()} for p in parts],
           "bare_ops": _ops(lambda: bare_forward_tps(model, ids, cfg.batch_size, device)),
           "teacher_step_ops": _ops(run_teacher)}
    runner.close()
    return out


def writer_alone(unit: dict, layout, units: int, threads: int) -> dict:
    """Write ``unit`` as units 0..units-1 of a fresh cache with ``threads`` threads; MB/s raw."""
    from dataclasses import replace

    lay = replace(layout, n_sequences=units * layout.shard_size)
    root = Path(tempfile.mkdtemp(prefix="profile-writer-")) / "c"
    writer = CacheWriter.open(root, lay, {"profile": True})
    raw = sum(a.nbytes for a in unit.values())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda u: writer.write_unit(u, unit), range(units)))
    dt = time.perf_counter() - t0
    shutil.rmtree(root.parent)
    return {"threads": threads, "units": units, "raw_mb": round(units * raw / 1e6, 1),
            "seconds": round(dt, 3), "mb_per_s": round(units * raw / 1e6 / dt, 1)}


def per_byte_costs(unit: dict, layout) -> dict:
    """Single-threaded MB/s of each step on the unit's arrays, with the codecs the layout names."""
    import hashlib
    import os

    import google_crc32c
    from numcodecs import Blosc

    specs = layout.array_specs()
    out = {}

    def rate(label, fn, arrays):
        nbytes = sum(a.nbytes for a in arrays)
        t0 = time.perf_counter()
        for a in arrays:
            fn(a)
        out[label] = round(nbytes / 1e6 / (time.perf_counter() - t0), 1)

    hidden = [a for n, a in unit.items() if n.startswith("hidden/")]
    logits = [a for n, a in unit.items() if n.startswith("logits/")]

    def blosc_of(name):
        b = specs[name]["compressors"][0]
        return Blosc(cname=b.cname.name, clevel=b.clevel, shuffle=int(b.shuffle != b.shuffle.noshuffle),
                     typesize=unit[name].dtype.itemsize)

    import numcodecs.blosc as nb
    nb.use_threads = False  # as from a worker thread: one thread per call
    first_hidden = next(n for n in unit if n.startswith("hidden/"))
    first_logit = next((n for n in unit if n.startswith("logits/")), None)
    per_seq = lambda a: [a[i] for i in range(a.shape[0])]  # noqa: E731  inner chunk = one sequence
    hb = blosc_of(first_hidden)
    rate(f"Blosc {hb.cname} (hidden)", lambda a: hb.encode(np.ascontiguousarray(a)),
         [s for a in hidden for s in per_seq(a)])
    if first_logit:
        lb = blosc_of(first_logit)
        rate(f"Blosc {lb.cname} (logits)", lambda a: lb.encode(np.ascontiguousarray(a)),
             [s for a in logits for s in per_seq(a)])
    rate("crc32c", lambda a: google_crc32c.value(a.tobytes()), list(unit.values()))
    rate("sha256 (array_digest: tobytes + hash)", lambda a: hashlib.sha256(a.tobytes()).hexdigest(),
         list(unit.values()))
    rate("tobytes copy", lambda a: a.tobytes(), list(unit.values()))
    tmp = Path(tempfile.mkdtemp(prefix="profile-disk-"))

    def write_fsync(a):
        p = tmp / "f"
        with open(p, "wb") as f:
            f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
    rate("file write + fsync", write_fsync, list(unit.values()))
    shutil.rmtree(tmp)
    return out


def markdown(result: dict, args) -> str:
    r = result["build_profile"]
    b = r["build"]
    wall = b["wall_seconds"]
    lines = [f"# cache-build profile ({args.tag}, {args.label})", "",
             f"`{result['command']}` on {result['date']}", "", f"Machine: {short(result['machine'])}", "",
             f"{args.n_sequences} x {args.seq_len} tokens, batch {args.batch_size}, top-{args.top_k}, "
             f"layers {args.layers}, shard {args.shard_size}, teacher {args.teacher} ({args.dtype}) "
             f"on {args.device}.", "",
             *([args.note, ""] if args.note else []),
             "One instrumented build (torch.profiler on the main thread, cProfile in every other "
             "thread), so its speed is below an uninstrumented build's; the machine is shared with "
             "other jobs.", "",
             *teacher_markdown(result["teacher_alone"]),
             "## One build: its own record", "",
             "| wall s | teacher s | writer s | tokens/s |", "|---|---|---|---|",
             f"| {wall} | {b['teacher_seconds']} | {b['writer_seconds']} | {b['tokens_per_second']} |", "",
             "## Main thread (the teacher's): seconds", "", "| phase | s | share of build wall |", "|---|---|---|"]
    for k, v in sorted(r["main_thread_seconds"].items(), key=lambda x: -x[1]):
        lines.append(f"| {k} | {v} | {v / wall:.1%} |")
    lines += ["", f"Torch ops, self CPU seconds (top 15 of {r['torch_ops_total_self_cpu_seconds']} s):", "",
              "| op | s |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in r["torch_ops_self_cpu_seconds"].items()]
    lines += ["", "## Every other thread (writers, Zarr's loop and workers): own seconds by kind of work", "",
              "| work | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["other_threads_own_seconds"].items()]
    lines += ["", "By thread name: " + ", ".join(f"{k} {v} s" for k, v in r["other_threads_by_kind"].items()), ""]
    lines += ["## The writer alone (the build's first unit, written again; no teacher running)", "",
              "| threads | units | raw MB | s | MB/s |", "|---|---|---|---|---|"]
    lines += [f"| {w['threads']} | {w['units']} | {w['raw_mb']} | {w['seconds']} | {w['mb_per_s']} |"
              for w in result["writer_alone"]]
    lines += ["", "## Per-byte costs, one thread, on that unit (MB/s)", "", "| step | MB/s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["per_byte_costs"].items()]
    return "\n".join(lines) + "\n"


def teacher_markdown(t: dict) -> list[str]:
    lines = ["## The teacher alone: bare forward vs the build's teacher step (no writer)", "",
             "| repeat | bare tokens/s | teacher step tokens/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {i} | {b} | {s} | {r} |" for i, (b, s, r) in
              enumerate(zip(t["bare_tokens_per_s"], t["teacher_step_tokens_per_s"], t["ratio_step_over_bare"]))]
    pm = t["parts_seconds_median"]
    fwd, head = pm["forward (blocks + final norm)"], pm["head alone (chunked, fp32 logits)"]
    step = fwd + pm["logit encode (head + top-k + tail + casts, copy)"] + pm["hidden encode (casts, copy)"]
    lines += ["", f"Median ratio {t['median_ratio']} (whole passes, so the machine's load moves it).", "",
              "The step in parts, timed batch by batch in the same passes (median seconds):", "",
              "| part | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in pm.items()]
    lines += ["", f"From the parts: (forward + head) / (forward + logit encode + hidden encode) = "
              f"**{(fwd + head) / step:.3f}**, the most a build can reach here against the bare forward "
              "with a writer that costs nothing.", "",
              "Torch ops, self CPU seconds, one pass each (the two passes ran at different moments of "
              "a shared machine: compare the ops only one of them has):", "",
              "| op | bare forward | teacher step |", "|---|---|---|"]
    keys = list(dict.fromkeys([*t["teacher_step_ops"]["top"], *t["bare_ops"]["top"]]))
    lines += [f"| `{k}` | {t['bare_ops']['top'].get(k, '-')} | {t['teacher_step_ops']['top'].get(k, '-')} |"
              for k in keys]
    lines += [f"| all ops | {t['bare_ops']['total']} | {t['teacher_step_ops']['total']} |", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:smollm2")
    p.add_argument("--data", default="builtin:pydoc_topics")
    p.add_argument("--split", default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-sequences", type=int, default=48)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--layers", default="6,12,18,24,30")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--teacher-repeats", type=int, default=3, help="interleaved timings in the teacher-alone part")
    p.add_argument("--writer-units", type=int, default=8, help="units written in the writer-alone part")
    p.add_argument("--writer-threads", default="1,2", help="thread counts of the writer-alone part")
    p.add_argument("--tag", default=None)
    p.add_argument("--label", default="now", help="before / after: part of the results name")
    p.add_argument("--note", default="")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    args.tag = resolve_tag(args.tag, torch.device(args.device).type)

    out = Path(tempfile.mkdtemp(prefix="profile-cache-")) / "cache"
    cfg = BuildConfig(teacher=args.teacher, data=args.data, split=args.split, out=str(out),
                      seq_len=args.seq_len, top_k=args.top_k, layers=args.layers,
                      max_sequences=args.n_sequences, batch_size=args.batch_size,
                      shard_size=args.shard_size, dtype=args.dtype, device=args.device)
    alone_teacher = teacher_alone(cfg, args.teacher_repeats)
    build_profile, unit = profile_build(cfg)
    from unidistill.storage.reader import CacheReader
    layout = CacheReader(out).layout
    shutil.rmtree(out.parent)
    alone = [writer_alone(unit, layout, args.writer_units, int(t)) for t in args.writer_threads.split(",")]
    result = {"command": "python " + shlex.join([sys.argv[0]] + (argv or sys.argv[1:])),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(args.device),
              "settings": {k: v for k, v in vars(args).items() if k != "results"},
              "teacher_alone": alone_teacher, "build_profile": build_profile, "writer_alone": alone,
              "per_byte_costs": per_byte_costs(unit, layout)}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"cache_build_profile_{args.tag}-{args.label}"
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, args)
    (results / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
