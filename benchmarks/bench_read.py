"""Read path: sequences per second from a cache on local disk and on an S3 API, one array after
another (each opened per read, as a naive reader does) against ``CacheReader.read`` (arrays
opened once per process, all arrays of a sequence fetched concurrently), and through a DataLoader
with workers.

Usage (needs the test extra: moto[server], s3fs):
    python benchmarks/bench_read.py --cache out/bench-storage/cache-topk-64 --tag cpu
The S3 API is moto's server on loopback: no network latency, so the gain on a real object store
(milliseconds per request) is larger than measured here.
Results: benchmarks/results/read_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate
from machine import machine  # benchmarks/machine.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"


def naive_tps(root: str, n: int) -> float:
    """One array after another, each opened for every read (its metadata read each time)."""
    from unidistill.storage import CacheReader

    reader = CacheReader(root)
    names = list(reader.layout.array_specs())
    group = reader.group
    t0 = time.perf_counter()
    for i in range(n):
        for name in names:
            group[name][i]
    return n * reader.layout.seq_len / (time.perf_counter() - t0)


def reader_tps(root: str, n: int) -> float:
    from unidistill.storage import CacheReader

    reader = CacheReader(root)
    reader.read(0)  # open the arrays
    t0 = time.perf_counter()
    for i in range(n):
        reader.read(i)
    return n * reader.layout.seq_len / (time.perf_counter() - t0)


def loader_tps(root: str, workers: int, batch_size: int = 4) -> float:
    from unidistill.storage import CacheReader
    from unidistill.trainer.dataset import CacheDataset

    dataset = CacheDataset(root, layers=list(CacheReader(root).layout.layers))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=default_collate)
    t0 = time.perf_counter()
    n = sum(batch["input_ids"].numel() for batch in loader)
    return n / (time.perf_counter() - t0)


def start_s3():
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a finished local cache (e.g. from bench_storage.py)")
    p.add_argument("--sequences", type=int, default=40)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    opts = p.parse_args(argv)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = start_s3()
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(opts.cache.rstrip("/") + "/", "bench/cache/", recursive=True)
    from unidistill.storage import CacheReader

    n = min(opts.sequences, len(CacheReader(opts.cache)))
    rows = {}
    for where, root in (("local", opts.cache), ("s3 (moto, loopback)", "s3://bench/cache")):
        naive, concurrent = naive_tps(root, n), reader_tps(root, n)
        rows[where] = {"naive_tokens_per_s": round(naive, 1), "reader_tokens_per_s": round(concurrent, 1),
                       "reader_over_naive": round(concurrent / naive, 2),
                       "loader_tokens_per_s": {w: round(loader_tps(root, w), 1) for w in (0, 2)}}
        print(where, json.dumps(rows[where]), file=sys.stderr)
    server.stop()

    layout = CacheReader(opts.cache).layout
    command = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine("cpu"),
              "cache": {"path": opts.cache, "logits_mode": layout.logits_mode, "layers": list(layout.layers),
                        "seq_len": layout.seq_len, "arrays": len(layout.array_specs())},
              "sequences": n, "rows": rows}
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"read_{opts.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Read path ({opts.tag})", "", f"`{command}` on {result['date']}, {json.dumps(result['machine'])}", "",
          f"{n} sequences x {layout.seq_len} tokens, {layout.logits_mode} logits, hidden layers "
          f"{list(layout.layers)} ({len(layout.array_specs())} arrays per sequence).", "",
          "| store | naive: array after array, opened per read (tok/s) | `CacheReader.read`: concurrent (tok/s) "
          "| ratio | DataLoader 0 / 2 workers (tok/s) |", "|---|---|---|---|---|"]
    for where, r in rows.items():
        md.append(f"| {where} | {r['naive_tokens_per_s']:.0f} | {r['reader_tokens_per_s']:.0f} | "
                  f"{r['reader_over_naive']:.2f}x | {r['loader_tokens_per_s'][0]:.0f} / {r['loader_tokens_per_s'][2]:.0f} |")
    (results / f"read_{opts.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
