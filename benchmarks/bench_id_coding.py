"""Bytes per token of the cached top-k ids of a large vocabulary, under several codings.

No large-vocabulary teacher works offline here, so the ids are a real teacher's (a SmolLM2-135M
top-k cache, V = 49 152) spread over a larger vocabulary by scaling: id -> floor(id * V' / V).
That keeps what makes real ids compressible (likely tokens cluster at low ids in a BPE
vocabulary; neighbouring positions share ids) and makes the gaps between sorted ids as large as
in a V' vocabulary. Each sequence is compressed alone, as one inner chunk of the cache is.

Usage:
    python benchmarks/bench_id_coding.py --cache out/demo/cache --vocab 262144 --tag cpu
Results: benchmarks/results/id_coding_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from machine import machine  # benchmarks/machine.py, beside this script
from numcodecs import Blosc

RESULTS = Path(__file__).resolve().parent / "results"


def per_token(arrays: np.ndarray, n_tokens: int, shuffle: int, clevel: int = 3) -> float:
    codec = Blosc(cname="zstd", clevel=clevel, shuffle=shuffle)
    return sum(len(codec.encode(np.ascontiguousarray(a))) for a in arrays) / n_tokens


def codings(ids: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """ids (N, L, K) int64 in probability order, values (N, L, K) fp16 -> {coding: bytes/token}."""
    n = ids.shape[0] * ids.shape[1]
    ordered = np.sort(ids, -1)
    deltas = np.concatenate([ordered[..., :1], np.diff(ordered, axis=-1)], -1)
    gaps, counts = np.unique(deltas[..., 1:], return_counts=True)
    p = counts / counts.sum()
    order = np.argsort(ids, -1, kind="stable")
    return {
        "ids int32, probability order (topk today), Blosc-zstd byte shuffle":
            per_token(ids.astype(np.int32), n, Blosc.SHUFFLE),
        "ids int32, ascending, delta-coded (topk-q8 today), byte shuffle":
            per_token(deltas.astype(np.int32), n, Blosc.SHUFFLE),
        "the same, bit shuffle": per_token(deltas.astype(np.int32), n, Blosc.BITSHUFFLE),
        "the same, zstd level 9": per_token(deltas.astype(np.int32), n, Blosc.SHUFFLE, 9),
        "delta-coded, split uint16 + uint8 (17-24 bits an id), bit shuffle":
            per_token((deltas & 0xFFFF).astype(np.uint16), n, Blosc.BITSHUFFLE)
            + per_token((deltas >> 16).astype(np.uint8), n, Blosc.BITSHUFFLE),
        "bound: order-0 entropy of the gaps (ideal coder of each gap alone)":
            float(-(p * np.log2(p)).sum()) * (ids.shape[-1] - 1) / 8,
        "fp16 log-probs, probability order (topk today)": per_token(values, n, Blosc.SHUFFLE),
        "fp16 log-probs in ascending-id order (what sorting the ids costs topk)":
            per_token(np.take_along_axis(values, order, -1), n, Blosc.SHUFFLE),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a topk cache of a real teacher")
    p.add_argument("--vocab", type=int, nargs="+", default=[152064, 262144])
    p.add_argument("--sequences", type=int, default=40)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    group = zarr.open_group(args.cache, mode="r")
    v0 = int(json.loads(Path(args.cache, "zarr.json").read_text())["attributes"]["unidistill"]
             ["layout"]["vocab_size"])
    ids = group["logits/indices"][:args.sequences].astype(np.int64)
    values = group["logits/values"][:args.sequences]
    rows = {v0: codings(ids, values)}
    for v in args.vocab:
        rows[v] = codings(np.floor(ids * (v / v0)).astype(np.int64), values)
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "machine": machine("cpu"), "cache": args.cache, "tokens": int(ids.shape[0] * ids.shape[1]),
           "top_k": int(ids.shape[-1]), "bytes_per_token": {str(k): r for k, r in rows.items()}}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    base = Path(args.results) / f"id_coding_{args.tag}"
    base.with_suffix(".json").write_text(json.dumps(out, indent=2))
    vocabs = list(rows)
    lines = [f"# Top-k ids of large vocabularies: bytes per token ({args.tag})", "",
             f"`{out['command']}` on {out['date']}. {out['tokens']} tokens of {args.cache}, top-"
             f"{out['top_k']}; V = {v0} is the real teacher's, larger V are its ids scaled (see the "
             "script's docstring). Each sequence compressed alone, as one inner chunk.", "",
             "| coding | " + " | ".join(f"V = {v}" for v in vocabs) + " |",
             "|---|" + "---|" * len(vocabs)]
    for name in rows[v0]:
        lines.append(f"| {name} | " + " | ".join(f"{rows[v][name]:.1f}" for v in vocabs) + " |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
