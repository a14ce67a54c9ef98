"""The same measurements on two versions of the code, interleaved in one run: is the later
version no slower than the earlier?

    git worktree add /tmp/before <earlier commit>
    python benchmarks/bench_versions.py trainer --before /tmp/before --work /tmp/bench-trainer \\
        --modes plain,cache,online --repeats 3
    python benchmarks/bench_versions.py read --before /tmp/before --cache /tmp/bench-trainer/cache \\
        --repeats 5

- ``trainer``: each version runs its own ``benchmarks/bench_trainer.py`` for one mode in a child
  process (``--mode M``), on one cache and one student (``--work``: a folder that
  ``bench_trainer.py --work`` has prepared). Tokens/s after the warm-up steps and peak RSS.
- ``read``: each version's ``CacheReader.read`` over the cache's sequences, and a ``DataLoader``
  (0 and 2 workers, batches of 4, that version's own collate) over its ``CacheDataset``, from the
  folder and from moto's S3 server on loopback (an upload of the folder). Every measurement warms
  up untimed first; a DataLoader is timed from its first batch on.

Every child imports ``unidistill`` from its version's tree (``PYTHONPATH``; the child prints
which file it imported and the run refuses a mismatch). Rounds alternate which version goes
first, so drift on a shared machine hits both alike. Results:
benchmarks/results/versions_<what>_<tag>.{json,md}: medians, lowest-highest and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import REPO, machine  # benchmarks/machine.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"


# -- the children: run inside one version's tree ----------------------------------------------

def child_read(root: str, n: int | None, batch: int, passes: int = 1) -> dict:
    """tokens/s of ``read`` and of a DataLoader with 0 and 2 workers (``passes`` times over the
    sequences, so the timing lasts), this version's code."""
    from torch.utils.data import DataLoader

    import unidistill
    from unidistill.storage import CacheReader
    from unidistill.trainer import dataset as ds_module

    reader = CacheReader(root)
    n = min(n or len(reader), len(reader))
    seq_len = reader.layout.seq_len
    reader.read(n - 1)
    t0 = time.perf_counter()
    for i in range(n):
        reader.read(i)
    out = {"read": n * seq_len / (time.perf_counter() - t0), "imported": unidistill.__file__}
    collate = getattr(ds_module, "collate_cache_batch", None)  # earlier versions' own collate
    for workers in (0, 2):
        ds = ds_module.CacheDataset(root, layers=list(reader.layout.layers))
        ds[0]
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, sampler=list(range(n)) * passes,
                            **({"collate_fn": collate} if collate else {}))
        it = iter(loader)
        next(it)
        t0, tokens = time.perf_counter(), 0
        for b in it:
            tokens += b["input_ids"].numel()
        out[f"DataLoader {workers} workers"] = tokens / (time.perf_counter() - t0)
    return out


# -- the parent --------------------------------------------------------------------------------

def run_child(tree: Path, argv: list[str], env: dict | None = None) -> dict:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, *argv], cwd=tree, env=env, check=True, stdout=subprocess.PIPE,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_imported(tree: Path, imported: str) -> None:
    if not Path(imported).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"a child meant for {tree} imported unidistill from {imported}: uninstall the "
                         "editable package or run from a plain environment")


def trainer_round(opts, tree: Path, label: str) -> dict:
    out = {}
    for mode in opts.modes.split(","):
        work = Path(opts.work)
        argv = [str(tree / "benchmarks" / "bench_trainer.py"), "--mode", mode, "--cache", str(work / "cache"),
                "--student", str(work / "student"), "--run-dir", str(work / f"run-{label}-{mode}"),
                "--device", "cpu", "--seq-len", str(opts.seq_len), "--batch-size", str(opts.batch_size),
                "--warmup-steps", str(opts.warmup_steps), "--steps", str(opts.steps),
                "--align-layers", opts.align_layers, "--top-k", str(opts.top_k)]
        r = run_child(tree, argv)
        out[mode] = {"tokens_per_s": r["tokens_per_s"], "peak_rss_mib": r["peak_rss_mib"]}
        print(f"[versions] {label} {mode}: {out[mode]}", file=sys.stderr, flush=True)
    if "cache" in out:
        for other in ("plain", "online"):
            if other in out:
                out[f"cache / {other}"] = out["cache"]["tokens_per_s"] / out[other]["tokens_per_s"]
    return out


def read_round(opts, tree: Path, label: str) -> dict:
    out = {}
    for where, root in (("local", opts.cache), ("s3 (moto)", "s3://bench/cache")):
        if where not in opts.where:
            continue
        r = run_child(tree, [__file__, "--child-read", root, "--sequences", str(opts.sequences or 0),
                             "--batch-size", str(opts.batch_size), "--passes", str(opts.passes)])
        check_imported(tree, r.pop("imported"))
        out.update({f"{where}: {k}": v for k, v in r.items()})
        print(f"[versions] {label} {where}: {r}", file=sys.stderr, flush=True)
    return out


def flatten(rec: dict) -> dict:
    flat = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            flat.update({f"{k} {kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def summarize(runs: dict) -> dict:
    """{version: [round records]} -> {measure: {version: {median, min, max, runs}}}."""
    table: dict = {}
    for version, rounds in runs.items():
        for rec in rounds:
            for k, v in flatten(rec).items():
                table.setdefault(k, {}).setdefault(version, []).append(v)
    return {k: {ver: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                for ver, v in vs.items()} for k, vs in table.items()}


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# {result['what']}: before and after, interleaved ({result['tag']})", "",
             f"`{result['command']}` on {result['date']}", "",
             f"Before: {result['before']['tree']} at {result['before']['commit']}. After: "
             f"{result['after']['tree']} at {result['after']['commit']}. Machine: "
             f"{json.dumps(result['machine'])}", "", result["settings_line"], "",
             f"Medians of {result['repeats']} rounds (lowest-highest); rounds alternate which version "
             "goes first.", "", "| measure | before | after | after / before |", "|---|---|---|---|"]
    for k, v in s.items():
        b, a = v.get("before"), v.get("after")
        cell = lambda x: f"{_num(x['median'])} ({_num(x['min'])}-{_num(x['max'])})" if x else "-"
        ratio = f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "-"
        lines.append(f"| {k} | {cell(b)} | {cell(a)} | {ratio} |")
    return "\n".join(lines) + "\n"


def start_s3(cache: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_read import start_s3 as start  # moto on loopback, the cache uploaded

    import tempfile
    return start(cache, Path(tempfile.mkdtemp(prefix="bench-versions-")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=("trainer", "read"))
    p.add_argument("--before", help="the earlier version's tree (a git worktree)")
    p.add_argument("--after", default=str(REPO), help="the later version's tree (default: this one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", help="trainer: a folder bench_trainer.py --work prepared (cache, student)")
    p.add_argument("--modes", default="plain,cache,online")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--align-layers", default="4,8,12,16,20")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--cache", help="read: a finished local cache")
    p.add_argument("--sequences", type=int, default=None)
    p.add_argument("--where", default="local,s3 (moto)", help="read: local, s3 (moto) or both")
    p.add_argument("--passes", type=int, default=1, help="read: DataLoader passes over the sequences")
    p.add_argument("--render", metavar="JSON", help="only write the markdown of a saved result again")
    p.add_argument("--note", default="")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--child-read", metavar="ROOT", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.render:
        result = json.loads(Path(opts.render).read_text())
        Path(opts.render).with_suffix(".md").write_text(markdown(result))
        return
    opts.where = [w.strip() for w in opts.where.split(",")]
    if opts.child_read:
        print(json.dumps(child_read(opts.child_read, opts.sequences, opts.batch_size, opts.passes)))
        return
    if not opts.what or not opts.before:
        p.error("name what to measure (trainer or read) and --before")
    need = {"trainer": opts.work, "read": opts.cache}[opts.what]
    if not need:
        p.error(f"{opts.what} needs " + ("--work" if opts.what == "trainer" else "--cache"))
    trees = {"before": Path(opts.before), "after": Path(opts.after)}
    for tree in trees.values():  # each child must import its own tree's unidistill
        check_imported(tree, run_child(tree, ["-c", "import json, unidistill; "
                                              "print(json.dumps(unidistill.__file__))"]))
    server = start_s3(opts.cache) if opts.what == "read" and "s3 (moto)" in opts.where else None
    one_round = trainer_round if opts.what == "trainer" else read_round
    runs: dict = {"before": [], "after": []}
    try:
        for r in range(opts.repeats):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for label in order:
                print(f"[versions] round {r + 1}/{opts.repeats}: {label}", file=sys.stderr, flush=True)
                runs[label].append(one_round(opts, trees[label], label))
    finally:
        if server is not None:
            server.kill()
    write(opts, trees, runs)


def tree_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+dirty" if dirty else "")


def write(opts, trees: dict, runs: dict) -> None:
    settings = (f"{opts.batch_size} x {opts.seq_len}-token batches, {opts.steps} timed steps after "
                f"{opts.warmup_steps} warm-up, modes {opts.modes}, aligned blocks {opts.align_layers}, "
                f"cache {opts.work}/cache" if opts.what == "trainer"
                else f"cache {opts.cache}, batches of {opts.batch_size}, DataLoaders {opts.passes} "
                     "pass(es) over the sequences")
    result = {"what": opts.what, "tag": opts.tag, "command": "python " + shlex.join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine("cpu"),
              "before": {"tree": str(trees["before"]), "commit": tree_commit(trees["before"])},
              "after": {"tree": str(trees["after"]), "commit": tree_commit(trees["after"])},
              "repeats": opts.repeats, "settings_line": settings + (f". {opts.note}" if opts.note else ""),
              "summary": summarize(runs), "runs": runs}
    out = Path(opts.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"versions_{opts.what}_{opts.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
