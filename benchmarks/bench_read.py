"""Read path: tokens per second from a cache on local disk and on an S3 API (read by s3fs and by
obstore), sequence by sequence, batch by batch, ahead of the reads, through a read-through folder
and through a DataLoader; and how long a trainer stand-in waits for its batches.

Usage (needs the test extra: moto[server], s3fs; obstore for its row):
    python benchmarks/bench_read.py --cache out/bench-storage/cache-topk-64 --tag cpu
    python benchmarks/bench_read.py --render benchmarks/results/read_cpu.json   # markdown again

Method. The S3 API is moto's server in a process of its own on loopback (in this process it
would share the GIL with s3fs, which obstore's Rust client does not need). Every measurement
makes a fresh reader and warms it up untimed (arrays opened, a first read, so connections are
made) before the clock starts; a DataLoader is timed from its first batch on (its workers'
start is left out). The measurements of all stores are interleaved, in an order rotated each
repeat, and each figure is the median of the repeats with the lowest and highest beside it.
Shuffled reads use one permutation per repeat, the same for every variant. moto on loopback has no
network latency but is a slow Python server sharing the CPUs with the client, so absolute S3
figures are not a real object store's; ratios between variants of one row are the result.

Measurements (batch = ``--batch-size`` sequences):
- ``naive``: one sequence at a time, array after array, each array opened for every read;
- ``read``: ``CacheReader.read``, one sequence at a time (its arrays fetched concurrently);
- ``batch, sequential|shuffled``: ``CacheDataset.__getitems__``, one concurrent gather per batch;
- ``prefetch 2, sequential``: the same with the reader reading 2 shards ahead into memory;
- ``DataLoader N workers``: a DataLoader over the dataset, sequential batches;
- ``read-through cold|cold + copy-ahead|warm``: shuffled batches through a read-through folder
  (empty at the start, without / with copy-ahead of 2 shards; then full);
- ``trainer stand-in``: a DataLoader in shuffled order whose loop sleeps ``--step-ms`` per batch
  (a GPU step leaves the CPU free); the figure is the mean wait for a batch per step, first
  batch excluded.
Results: benchmarks/results/read_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from machine import machine  # benchmarks/machine.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
READER_ENV = "UNIDISTILL_S3_READER"
STORES = ("local", "s3 (moto) s3fs", "s3 (moto) obstore")


@contextlib.contextmanager
def s3_reader(store: str):
    """The S3 client of the readers made inside: obstore for that row, s3fs otherwise."""
    old = os.environ.pop(READER_ENV, None)
    if store.endswith("obstore"):
        os.environ[READER_ENV] = "obstore"
    try:
        yield
    finally:
        os.environ.pop(READER_ENV, None)
        if old is not None:
            os.environ[READER_ENV] = old


def reader(root, **kw):
    from unidistill.storage import CacheReader

    return CacheReader(root, **kw)


def dataset(root, **kw):
    from unidistill.trainer.dataset import CacheDataset

    layers = list(reader(root).layout.layers)
    return CacheDataset(root, layers=layers, **kw)


def batches(order, size):
    return [order[s:s + size] for s in range(0, len(order), size)]


def timed_tps(fn, n_tokens) -> float:
    t0 = time.perf_counter()
    fn()
    return n_tokens / (time.perf_counter() - t0)


# -- the measurements: each warms up untimed, then returns tokens/s ----------------------------

def m_naive(root, ctx):
    r = reader(root)
    names, group = list(r.layout.array_specs()), r.group
    for name in names:
        group[name][0]

    def run():
        for i in range(ctx["n"]):
            for name in names:
                group[name][i]
    return timed_tps(run, ctx["n"] * ctx["seq_len"])


def m_read(root, ctx):
    r = reader(root)
    r.read(ctx["n"] - 1)
    return timed_tps(lambda: [r.read(i) for i in range(ctx["n"])], ctx["n"] * ctx["seq_len"])


def m_batches(root, ctx, order, *, cold=False, **kw):
    ds = dataset(root, **kw)
    if cold:  # a read-through folder to be timed from empty: only the arrays' metadata read
        ds.reader._arrays()
    else:  # the last sequence: nothing is read ahead after it
        ds.__getitems__([ctx["n"] - 1])
    return timed_tps(lambda: [ds.__getitems__(b) for b in batches(order, ctx["batch"])],
                     len(order) * ctx["seq_len"])


def m_loader(root, ctx, workers, store):
    ds = dataset(root)
    ds[0]  # the main process reads first, as distill-from-cache does
    spawn = "spawn" if workers and store.endswith("obstore") else None  # obstore is not fork-safe
    loader = DataLoader(ds, batch_size=ctx["batch"], num_workers=workers, collate_fn=default_collate,
                        sampler=list(range(ctx["n"])), multiprocessing_context=spawn)
    it = iter(loader)
    next(it)  # workers started, first batch in: the clock starts here
    t0, tokens = time.perf_counter(), 0
    for batch in it:
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - t0)


def m_read_through(root, ctx, order, state):
    folder = Path(tempfile.mkdtemp(prefix="rt-", dir=ctx["work"]))
    try:
        if state == "warm":
            m_batches(root, ctx, order, local_dir=folder, prefetch=0)  # fills the folder
        prefetch = 2 if state == "cold + copy-ahead" else 0
        return m_batches(root, ctx, order, cold=state != "warm", local_dir=folder, prefetch=prefetch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def m_trainer(root, ctx, order, workers, store, through, prefetch=None):
    """Mean seconds a trainer stand-in waits per step (first batch excluded)."""
    folder = Path(tempfile.mkdtemp(prefix="rt-", dir=ctx["work"])) if through else None
    try:
        ds = dataset(root, local_dir=folder, prefetch=prefetch)
        ds.reader.read(0, layers=[], logits=False)  # the main process's check read, as distill-from-cache's
        spawn = "spawn" if workers and store.endswith("obstore") else None
        loader = DataLoader(ds, batch_size=ctx["batch"], num_workers=workers, sampler=order,
                            collate_fn=default_collate, multiprocessing_context=spawn)
        waits, it = [], iter(loader)
        next(it)
        while True:
            time.sleep(ctx["step_s"])
            t0 = time.perf_counter()
            if next(it, None) is None:
                break
            waits.append(time.perf_counter() - t0)
        return statistics.fmean(waits)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


STAND_INS = {  # name: (workers, read-through folder, prefetch)
    "0 workers": (0, False, None), "2 workers": (2, False, None),
    "0 workers, read-through from cold, no copy-ahead": (0, True, 0),
    "0 workers, read-through from cold, copy-ahead 2 (default)": (0, True, None),
    "2 workers, read-through from cold, copy-ahead 2 (default)": (2, True, None),
}


def plan(ctx) -> list[tuple[str, str, object]]:
    """(store, measurement, function of (root, order)) for every figure of a repeat."""
    out = []
    for store in ctx["stores"]:
        remote = store != "local"
        out += [(store, "naive", lambda root, order: m_naive(root, ctx)),
                (store, "read", lambda root, order: m_read(root, ctx)),
                (store, "batch, sequential", lambda root, order: m_batches(root, ctx, list(range(ctx["n"])))),
                (store, "batch, shuffled", lambda root, order: m_batches(root, ctx, order)),
                (store, "prefetch 2, sequential",
                 lambda root, order: m_batches(root, ctx, list(range(ctx["n"])), prefetch=2))]
        out += [(store, f"DataLoader {w} workers", lambda root, order, w=w, s=store: m_loader(root, ctx, w, s))
                for w in (0, 2)]
        if remote:
            out += [(store, f"read-through {state}", lambda root, order, st=state: m_read_through(root, ctx, order, st))
                    for state in ("cold", "cold + copy-ahead", "warm")]
        for name, (workers, through, prefetch) in STAND_INS.items():
            if through and not remote:
                continue
            out.append((store, f"trainer stand-in, {name}", lambda root, order, w=workers, s=store,
                        t=through, f=prefetch: m_trainer(root, ctx, order, w, s, t, f)))
    return out


def start_s3(cache: str, work: Path):
    """moto's server in its own process on a free loopback port, the cache uploaded to it."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/").close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        raise SystemExit(f"moto's server did not answer at {endpoint} (log: {work / 'moto.log'})")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(cache.rstrip("/") + "/", "bench/cache/", recursive=True)
    return server


def spread(runs: list[float]) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def measure(opts, ctx) -> dict:
    roots = {"local": opts.cache, **{s: "s3://bench/cache" for s in ctx["stores"] if s != "local"}}
    figures = plan(ctx)
    runs: dict = {}
    for rep in range(opts.repeats):
        order = np.random.default_rng(rep).permutation(ctx["n"]).tolist()
        shift = rep * len(figures) // opts.repeats
        for store, name, fn in figures[shift:] + figures[:shift]:
            with s3_reader(store):
                value = fn(roots[store], order)
            runs.setdefault(store, {}).setdefault(name, []).append(value)
            print(f"repeat {rep + 1}/{opts.repeats} {store:18s} {name:45s} {value:10.4g}",
                  file=sys.stderr, flush=True)
    return {store: {name: spread(v) for name, v in by_name.items()} for store, by_name in runs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="a finished local cache (e.g. from bench_storage.py)")
    p.add_argument("--sequences", type=int, help="read the first N sequences (default: all; a "
                   "shorter pass leaves shards unread that copy-ahead still copies)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=100.0, help="the trainer stand-in's step")
    p.add_argument("--no-obstore", action="store_true", help="leave out the obstore row")
    p.add_argument("--note", default="", help="how the cache was made (written into the results)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--render", metavar="JSON", help="only write the markdown of a saved result again")
    opts = p.parse_args(argv)
    if opts.render:
        result = json.loads(Path(opts.render).read_text())
        Path(opts.render).with_suffix(".md").write_text(render(result))
        return
    if not opts.cache:
        p.error("--cache is required (or --render)")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    layout = reader(opts.cache).layout
    work = Path(tempfile.mkdtemp(prefix="bench-read-"))
    stores = [s for s in STORES if not (opts.no_obstore and s.endswith("obstore"))]
    ctx = {"n": min(opts.sequences or layout.n_sequences, layout.n_sequences), "seq_len": layout.seq_len, "batch": opts.batch_size,
           "step_s": opts.step_ms / 1000, "work": work, "stores": stores}
    server = start_s3(opts.cache, work)
    try:
        rows = measure(opts, ctx)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    command = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
    versions = {}
    for name in ("s3fs", "obstore", "moto", "fsspec"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine("cpu"),
              "versions": versions, "shared_machine": True, "cpu_cores": os.cpu_count(), "tag": opts.tag,
              "cache": {"path": opts.cache, "logits_mode": layout.logits_mode, "layers": list(layout.layers),
                        "seq_len": layout.seq_len, "shard_size": layout.shard_size,
                        "arrays": len(layout.array_specs()), "note": opts.note},
              "sequences": ctx["n"], "batch_size": opts.batch_size, "repeats": opts.repeats,
              "step_ms": opts.step_ms, "rows": rows}
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"read_{opts.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"read_{opts.tag}.md").write_text(render(result))
    print(render(result))


def _cell(fig: dict | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    if fig is None:
        return "–"
    lo, mid, hi = (fmt.format(fig[k] * scale) for k in ("min", "median", "max"))
    return f"{mid} ({lo}–{hi})"


def _ratio(rows, store, a, base_store, b) -> str:
    try:
        return f"{rows[store][a]['median'] / rows[base_store][b]['median']:.2f}x"
    except (KeyError, ZeroDivisionError):
        return "–"


def render(result: dict) -> str:
    rows, stores = result["rows"], list(result["rows"])
    names = list(dict.fromkeys(n for s in stores for n in rows[s]))
    speed = [n for n in names if not n.startswith("trainer")]
    stand_in = [n for n in names if n.startswith("trainer")]
    c, m = result["cache"], result["machine"]
    md = [f"# Read path ({result['tag']})",
          "", f"`{result['command']}` on {result['date']}, commit {m.get('commit')}, "
          f"{result['cpu_cores']} CPU cores, **shared with other jobs** (figures are noisy: "
          f"medians of {result['repeats']} interleaved repeats, lowest–highest in brackets); "
          f"{json.dumps(result.get('versions', {}))}.", "",
          f"{result['sequences']} sequences x {c['seq_len']} tokens, {c['logits_mode']} logits, hidden layers "
          f"{c['layers']} ({c['arrays']} arrays; shards of {c['shard_size']} sequences), batches of "
          f"{result['batch_size']}. S3 = moto's server in its own process on loopback."
          + (f" Cache: {c['note']}" if c.get("note") else ""), "",
          "Tokens per second:", "", "| measurement | " + " | ".join(stores) + " |",
          "|---|" + "---|" * len(stores)]
    md += [f"| {n} | " + " | ".join(_cell(rows[s].get(n)) for s in stores) + " |" for n in speed]
    md += ["", f"Trainer stand-in (a step sleeps {result['step_ms']:.0f} ms; shuffled order): mean wait "
           "for a batch per step, ms:", "", "| loader | " + " | ".join(stores) + " |",
           "|---|" + "---|" * len(stores)]
    md += [f"| {n.removeprefix('trainer stand-in, ')} | " + " | ".join(
        _cell(rows[s].get(n), 1000) for s in stores) + " |" for n in stand_in]
    ratios = [("batch, shuffled", "read"), ("prefetch 2, sequential", "batch, sequential"),
              ("read-through cold + copy-ahead", "read-through cold"), ("read-through warm", "batch, shuffled")]
    md += ["", "Ratios of medians (same row):", "", "| ratio | " + " | ".join(stores) + " |",
           "|---|" + "---|" * len(stores)]
    md += [f"| {a} / {b} | " + " | ".join(_ratio(rows, s, a, s, b) for s in stores) + " |" for a, b in ratios]
    obs, s3 = "s3 (moto) obstore", "s3 (moto) s3fs"
    if obs in rows and s3 in rows:
        md += ["", "obstore / s3fs, same measurement (tokens/s: above 1 is faster; trainer stand-in "
               "waits: below 1 is shorter):", "", "| measurement | obstore / s3fs |", "|---|---|"]
        md += [f"| {n} | {_ratio(rows, obs, n, s3, n)} |" for n in names if n in rows[obs] and n in rows[s3]]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
