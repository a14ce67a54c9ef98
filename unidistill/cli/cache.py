"""``cache-build``, ``cache-info`` and ``cache-verify``: making a teacher cache and looking at one."""

from __future__ import annotations

import json
import sys

import click

from unidistill.cli.common import friendly_errors, with_options

_DEFAULT_BUILD_MAPS = "uniform,last"  # cache-build --layer-map


BUILD_OPTIONS = [  # cache-build's options, in --help order
    click.option("--teacher", required=True, help="Model folder, hub id, .gguf file, or builtin:smollm2."),
    click.option("--gguf-file", default=None, help="GGUF file name inside the --teacher folder."),
    click.option("--data", required=True,
                 help="builtin:pydoc_topics, builtin:stdlib_docs (Python docs), builtin:kjv_bible "
                      "(English prose, evaluation only), a .jsonl/.json/.parquet/.csv/.txt file, a "
                      "folder of text files, or a hub data set id (streamed)."),
    click.option("--data-config", default=None, help="Hub data set config, e.g. stories."),
    click.option("--split", default="train", show_default=True,
                 help="train | heldout | all for built-in text and local files and folders (a "
                      "local document is held out by the hash of its text); a hub data set's own "
                      "split names."),
    click.option("--heldout-share", type=float, default=None,
                 help="Local files and folders: share of documents held out [default: 0.05]. "
                      "Build the held-out cache with the same value."),
    click.option("--text-field", default="text", show_default=True),
    click.option("--messages-field", default=None,
                 help="The column holding conversations (lists of {role, content} messages): the "
                      "data are then conversations, rendered with the teacher's chat template. "
                      "Built-in conversations (builtin:python_qa) need none."),
    click.option("--train-on", default=None, type=click.Choice(["assistant", "all"]),
                 help="Which tokens the student learns to produce: the assistant turns, or every "
                      "token but each example's first [default: assistant for conversations, all "
                      "for text]."),
    click.option("--packing", default=None, type=click.Choice(["stream", "documents", "none"]),
                 help="stream: documents joined with EOS and attending to each other (text only); "
                      "documents: best-fit-decreasing rows whose documents are kept apart; none: "
                      "one example per row [default: stream for text, documents for "
                      "conversations]."),
    click.option("--pack-window", type=int, default=1024, show_default=True,
                 help="With --packing documents: examples per best-fit-decreasing window."),
    click.option("--generate", is_flag=True,
                 help="The teacher answers each conversation itself: the prompt is everything "
                      "before its last assistant message, the answer the teacher's (greedy unless "
                      "--sample), and the cache holds prompt + answer, one conversation per row "
                      "(--packing none), with the answer tokens as targets. Resumable; the "
                      "decoding settings are part of the cache's fingerprint."),
    click.option("--prompt-field", default=None,
                 help="--generate on rows of plain prompts (a local file or hub data set): the "
                      "column holding each prompt, asked as one user message."),
    click.option("--max-new-tokens", type=int, default=256, show_default=True,
                 help="--generate: the longest answer; prompts longer than --seq-len minus this "
                      "are dropped (counted)."),
    click.option("--sample", is_flag=True, help="--generate: sample the answers instead of greedy."),
    click.option("--gen-temperature", type=float, default=1.0, show_default=True,
                 help="--generate --sample: the sampling temperature (the cached log-probs are "
                      "the teacher's own, at T = 1, whatever this is)."),
    click.option("--gen-top-p", type=float, default=1.0, show_default=True,
                 help="--generate --sample: nucleus sampling (1 = off)."),
    click.option("--gen-top-k", type=int, default=0, show_default=True,
                 help="--generate --sample: sample among the k most likely (0 = off)."),
    click.option("--gen-repetition-penalty", type=float, default=1.0, show_default=True,
                 help="--generate: transformers' repetition penalty (1 = off)."),
    click.option("--gen-seed", type=int, default=0, show_default=True,
                 help="--generate: seeds each batch of answers (seed x 1000003 + its first row)."),
    click.option("--out", required=True,
                 help="Cache folder or URL (s3://bucket/prefix) to create, or to resume."),
    click.option("--seq-len", type=int, default=512, show_default=True),
    click.option("--logits", default="topk", show_default=True,
                 type=click.Choice(["topk", "topk-q8", "sampled", "exact"]),  # = LOGIT_CODECS (tested)
                 help="topk: the --top-k most likely ids + tail; topk-q8: the same with 8-bit "
                      "log-probs and delta-coded ids (about half the bytes); sampled: --samples draws per position "
                      "(distinct ids + counts); exact: the final hidden state + the teacher's head, "
                      "full vocabulary at any temperature."),
    click.option("--top-k", type=int, default=64, show_default=True),
    click.option("--samples", type=int, default=64, show_default=True,
                 help="With --logits sampled: draws per position."),
    click.option("--sample-seed", type=int, default=0, show_default=True),
    click.option("--temperatures", default=None,
                 help="topk/topk-q8: KD temperatures the cache serves exactly (default 1,2). Each "
                      "T != 1 stores the tempered tail log Σ_tail p^(1/T), 2 bytes per token."),
    click.option("--layers", default="all", show_default=True,
                 help="Teacher hidden_states indices to cache: 6,12,18,24,30 | all (1..n) | none."),
    click.option("--student-layers", type=int, default=None,
                 help="Instead of --layers: cache the teacher layers a student of this depth maps to."),
    click.option("--layer-map", "layer_maps", default=None, show_default=_DEFAULT_BUILD_MAPS,
                 help="With --student-layers: layer maps whose teacher layers to cache."),
    click.option("--map", "deprecated_map", default=None, hidden=True,
                 help="Deprecated name of --layer-map."),
    click.option("--max-sequences", type=int, default=None, help="Stop after this many sequences."),
    click.option("--batch-size", type=int, default=8, show_default=True,
                 help="Rows per teacher forward (and per generation batch with --generate)."),
    click.option("--shard-size", type=int, default=16, show_default=True,
                 help="Sequences per shard (= per work unit)."),
    click.option("--dtype", default="float32", show_default=True,
                 type=click.Choice(["float32", "bfloat16", "float16"]), help="Teacher compute dtype."),
    click.option("--hidden-dtype", default="auto", show_default=True,
                 type=click.Choice(["auto", "float16", "bfloat16", "int8"]),  # auto + HIDDEN_CODECS (tested)
                 help="Stored hidden-state dtype. auto: the teacher's own dtype (bfloat16 for a "
                      "bfloat16 teacher); for a float32 teacher float16 where the first batch's "
                      "states stay under 65504/4, else bfloat16. int8 keeps each sequence's 2 highest-norm tokens in "
                      "fp16 and one scale per channel and 64 tokens for the rest (about half of fp16, "
                      "robust to massive tokens and outlier channels)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N."),
    click.option("--overwrite", is_flag=True, help="Replace a complete cache at --out."),
    click.option("--wait", is_flag=True,
                 help="If another build holds --out's lease, wait for it to end instead of "
                      "being refused (a cache it finished is then reported complete)."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
]


@click.command("cache-build")
@with_options(BUILD_OPTIONS)
@friendly_errors
def cache_build(layer_maps, deprecated_map, quiet, **kwargs):
    """Run the teacher once over packed text or conversations and write the cache (resumable).

    \b
    Several processes split the work units (same cache as one process):
      torchrun --nproc_per_node N -m unidistill.cli cache-build ...
      accelerate launch --multi_gpu --num_processes N -m unidistill.cli cache-build ...
    """
    from unidistill.cache_builder.build import build_cache
    from unidistill.cache_builder.config import BuildConfig

    if deprecated_map is not None:
        if layer_maps is not None:
            raise click.UsageError("--map is the old name of --layer-map; give --layer-map only")
        click.echo("warning: --map is deprecated, use --layer-map", err=True)
        layer_maps = deprecated_map
    if layer_maps is None:
        layer_maps = _DEFAULT_BUILD_MAPS
    maps = tuple(m.strip() for m in layer_maps.split(",") if m.strip())
    cfg = BuildConfig(layer_maps=maps, **kwargs)
    build_cache(cfg, progress=not quiet, log=lambda m: click.echo(m, err=True))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


@click.command("cache-info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full information as JSON.")
@friendly_errors
def cache_info_cmd(path, as_json):
    """Show a cache's manifest, shapes, sizes on disk and bytes per token."""
    from unidistill.storage.info import cache_info

    info = cache_info(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    s = info["settings"]
    bpt = info["bytes_per_token"]
    click.echo(f"cache        {info['path']}")
    click.echo(f"status       {info['status']} ({info['units_committed']}/{info['units_total']} units)")
    click.echo(f"fingerprint  {info['fingerprint'] or '-'}")
    click.echo(f"teacher      {s['teacher']['source']}"
               + (f" ({s['teacher']['gguf_file']})" if s['teacher'].get('gguf_file') else "")
               + f", {s['teacher']['architecture']}, {s['teacher']['n_layers']} layers")
    click.echo(f"data         {s['data']['source']} split={s['data']['split']}"
               + (f" heldout_share={s['data']['heldout_share']}"
                  if s['data'].get('heldout_share') is not None else ""))
    click.echo(f"tokens       {info['n_sequences']} sequences x {info['seq_len']} = {info['n_tokens']}")
    click.echo(f"packing      {info['packing_description']}")
    if info["generation_description"]:
        click.echo(f"generation   {info['generation_description']}")
    click.echo(f"logits       {info['logits_description']}")
    click.echo(f"layers       {info['layers']} ({info['hidden_dtype']})")
    click.echo(f"bytes/token  logits {bpt['logits_disk']:.1f} on disk ({bpt['logits_raw']:.1f} raw), "
               f"hidden {bpt['hidden_disk']:.1f} on disk ({bpt['hidden_raw']:.1f} raw), "
               f"total {bpt['total_disk']:.1f}")
    click.echo("arrays:")
    for name, a in info["arrays"].items():
        click.echo(f"  {name:<16} {str(a['shape']):<20} {a['dtype']:<8} "
                   f"{_fmt_bytes(a['disk_bytes']):>10} on disk ({_fmt_bytes(a['raw_bytes'])} raw)")


@click.command("cache-verify")
@click.argument("path", type=click.Path())
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def cache_verify_cmd(path, quiet):
    """Re-read every unit; name each damaged or missing one. Exit code 1 on damage."""
    from tqdm.auto import tqdm

    from unidistill.storage.verify import verify_cache

    report = verify_cache(path, progress=None if quiet else
                          (lambda it: tqdm(it, desc="cache-verify", unit="unit")))
    for p in report.problems:
        click.echo(f"BAD  {p}")
    for f in report.stray_files:
        click.echo(f"note: leftover partial write {f} (harmless; an interrupted write)")
    if report.status != "complete":
        click.echo(f"status is {report.status!r}, not complete: rerun cache-build to finish it")
    if report.ok:
        click.echo(f"OK   {report.n_units} units verified")
    else:
        click.echo(f"DAMAGED: {len(report.problems)} problem(s) in {report.root}")
        sys.exit(1)
