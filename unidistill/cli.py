"""Command line: parsing only; the work lives in the packages."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from unidistill import __version__
from unidistill.errors import UnidistillError


class _RefusedError(click.ClickException):
    exit_code = 2


def _friendly_errors(fn):
    """Our own errors become a one-paragraph message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnidistillError as e:
            raise _RefusedError(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="unidistill")
def main():
    """Offline two-phase knowledge distillation: cache a teacher once, distill students from it."""


_DEFAULT_BUILD_MAPS = "uniform,last"  # cache-build --layer-map


@main.command("cache-build")
@click.option("--teacher", required=True, help="Model folder, hub id, .gguf file, or builtin:smollm2.")
@click.option("--gguf-file", default=None, help="GGUF file name inside the --teacher folder.")
@click.option("--data", required=True,
              help="builtin:pydoc_topics, builtin:stdlib_docs (Python docs), builtin:kjv_bible "
                   "(English prose, evaluation only), a .jsonl/.json/.parquet/.csv/.txt file, a "
                   "folder of text files, or a hub data set id (streamed).")
@click.option("--data-config", default=None, help="Hub data set config, e.g. stories.")
@click.option("--split", default="train", show_default=True,
              help="train | heldout | all for built-in text and local files and folders (a "
                   "local document is held out by the hash of its text); a hub data set's own "
                   "split names.")
@click.option("--heldout-share", type=float, default=None,
              help="Local files and folders: share of documents held out [default: 0.05]. "
                   "Build the held-out cache with the same value.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--out", required=True,
              help="Cache folder or URL (s3://bucket/prefix) to create, or to resume.")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--logits", default="topk", show_default=True,
              type=click.Choice(["topk", "topk-q8", "sampled", "exact"]),
              help="topk: the --top-k most likely ids + tail; topk-q8: the same with 8-bit "
                   "log-probs and delta-coded ids (about half the bytes); sampled: --samples draws per position "
                   "(distinct ids + counts); exact: the final hidden state + the teacher's head, "
                   "full vocabulary at any temperature.")
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--samples", type=int, default=64, show_default=True,
              help="With --logits sampled: draws per position.")
@click.option("--sample-seed", type=int, default=0, show_default=True)
@click.option("--temperatures", default=None,
              help="topk/topk-q8: KD temperatures the cache serves exactly (default 1,2). Each "
                   "T != 1 stores the tempered tail log Σ_tail p^(1/T), 2 bytes per token.")
@click.option("--layers", default="all", show_default=True,
              help="Teacher hidden_states indices to cache: 6,12,18,24,30 | all (1..n) | none.")
@click.option("--student-layers", type=int, default=None,
              help="Instead of --layers: cache the teacher layers a student of this depth maps to.")
@click.option("--layer-map", "layer_maps", default=None, show_default=_DEFAULT_BUILD_MAPS,
              help="With --student-layers: layer maps whose teacher layers to cache.")
@click.option("--map", "deprecated_map", default=None, hidden=True,
              help="Deprecated name of --layer-map.")
@click.option("--max-sequences", type=int, default=None, help="Stop after this many sequences.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--shard-size", type=int, default=16, show_default=True,
              help="Sequences per shard (= per work unit).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Teacher compute dtype.")
@click.option("--hidden-dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "bfloat16", "int8"]),
              help="Stored hidden-state dtype; int8 keeps each sequence's 2 highest-norm tokens in "
                   "fp16 and one scale per channel and 64 tokens for the rest (about half of fp16, "
                   "robust to massive tokens and outlier channels).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace a complete cache at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_friendly_errors
def cache_build(layer_maps, deprecated_map, quiet, **kwargs):
    """Run the teacher once over packed text and write the cache (resumable).

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


@main.command("cache-info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the full information as JSON.")
@_friendly_errors
def cache_info_cmd(path, as_json):
    """Show a cache's manifest, shapes, sizes on disk and bytes per token."""
    from unidistill.storage.info import cache_info
    from unidistill.storage.layout import HEAD_FILE

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
    temps = ", T = " + ",".join(f"{t:g}" for t in [1.0, *info.get("tail_temperatures", [])])
    click.echo("logits       " + {"topk": f"top-{info['top_k']} + tail{temps}",
                                  "topk-q8": f"top-{info['top_k']} + tail{temps}, 8-bit log-probs",
                                  "sampled": f"{info['top_k']} draws per position (ids + counts)",
                                  "exact": f"exact: final layer + {HEAD_FILE}"}[info["logits_mode"]])
    click.echo(f"layers       {info['layers']} ({info['hidden_dtype']})")
    click.echo(f"bytes/token  logits {bpt['logits_disk']:.1f} on disk ({bpt['logits_raw']:.1f} raw), "
               f"hidden {bpt['hidden_disk']:.1f} on disk ({bpt['hidden_raw']:.1f} raw), "
               f"total {bpt['total_disk']:.1f}")
    click.echo("arrays:")
    for name, a in info["arrays"].items():
        click.echo(f"  {name:<16} {str(a['shape']):<20} {a['dtype']:<8} "
                   f"{_fmt_bytes(a['disk_bytes']):>10} on disk ({_fmt_bytes(a['raw_bytes'])} raw)")


@main.command("cache-verify")
@click.argument("path", type=click.Path())
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_friendly_errors
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


def _config_option(fn):
    from unidistill.config_file import load_config_option

    return click.option("--config", type=click.Path(), is_eager=True, expose_value=False,
                        callback=load_config_option,
                        help="YAML/JSON file of option values (flags override it).")(fn)


@main.command("distill-from-cache")
@_config_option
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache built by cache-build.")
@click.option("--student", required=True, help="Student model folder (same tokenizer as the teacher).")
@click.option("--out", "output_dir", required=True, help="Run folder: checkpoints and final model.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Weight of CE.")
@click.option("--beta", type=float, default=0.5, show_default=True, help="Weight of T^2 * KL.")
@click.option("--gamma", type=float, default=0.0, show_default=True,
              help="Weight of the hidden loss (no measurable gain in benchmarks/results/recovery_cpu.md).")
@click.option("--temperature", "kd_temperature", type=float, default=1.0, show_default=True,
              help="KD temperature (T = 2 was no better than 1 in the recovery experiment).")
@click.option("--tail-approximation", type=click.Choice(["uniform"]), default=None,
              help="A top-k cache serves exactly the temperatures it was built with "
                   "(cache-build --temperatures); 'uniform' accepts any other T with the tail "
                   "mass spread evenly (an approximation, see README).")
@click.option("--kl-direction", type=click.Choice(["forward", "reverse", "jsd"]), default="forward",
              show_default=True)
@click.option("--hidden-loss", type=click.Choice(["mse", "nmse", "cnmse", "cosine"]), default="cosine",
              show_default=True,
              help="nmse: error over the teacher's energy; cnmse: the same per channel, averaged, so "
                   "massive-activation channels do not dominate.")
@click.option("--layer-map", default="uniform", show_default=True,
              help="uniform | last | original | JSON {student: teacher} | path.json")
@click.option("--hidden-warmup-steps", type=int, default=0, show_default=True,
              help="First optimizer steps that train the hidden-state loss alone (needs --gamma > 0), "
                   "then the full loss.")
@click.option("--align-layers", default="cached", show_default=True,
              help="cached | all | list of student blocks, e.g. 4,8,12")
@click.option("--projector-init", type=click.Choice(["auto", "channels", "xavier", "identity",
                                                    "orthogonal"]), default="auto", show_default=True,
              help="auto: channels for a width-pruned student (`unidistill prune`), else xavier.")
@click.option("--projector-learning-rate", type=float, default=None)
@click.option("--force-projectors", is_flag=True)
@click.option("--top-k", "kd_top_k", type=int, default=None, help="Use the k most likely cached ids.")
@click.option("--logits-chunk-size", type=int, default=64, show_default=True,
              help="Positions per chunk of logits (memory: batch x chunk x vocab fp32).")
@click.option("--max-steps", type=int, default=-1, show_default=True)
@click.option("--num-train-epochs", type=float, default=1.0, show_default=True)
@click.option("--learning-rate", type=float, default=3e-4, show_default=True)
@click.option("--per-device-train-batch-size", type=int, default=8, show_default=True)
@click.option("--gradient-accumulation-steps", type=int, default=1, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--lr-scheduler-type", default="cosine", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--logging-steps", type=float, default=10, show_default=True)
@click.option("--save-steps", type=float, default=500, show_default=True)
@click.option("--save-total-limit", type=int, default=None)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--bf16", is_flag=True, help="bf16 mixed precision.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--dataloader-num-workers", type=int, default=0, show_default=True)
@click.option("--report-to", default="none", show_default=True, help="none, tensorboard, ...")
@click.option("--use-cpu", is_flag=True, help="Train on the CPU even when a GPU is there.")
@click.option("--resume-from-checkpoint", default=None,
              help="A checkpoint folder, or 'last' for the newest in --out.")
@_friendly_errors
def distill_from_cache_cmd(cache, student, resume_from_checkpoint, report_to, **kwargs):
    """Train a student from a teacher cache: alpha*CE + beta*T^2*KL + gamma*hidden.

    \b
    Data parallel (DDP; gloo on CPU), per-device batch x N per step:
      torchrun --nproc_per_node N -m unidistill.cli distill-from-cache ...
      accelerate launch --multi_gpu --num_processes N -m unidistill.cli distill-from-cache ...
    """
    from unidistill.trainer.arguments import DistillationArguments
    from unidistill.trainer.run import distill_from_cache

    args = DistillationArguments(report_to=[] if report_to == "none" else report_to.split(","),
                                 save_strategy="steps", **kwargs)
    resume = True if resume_from_checkpoint == "last" else resume_from_checkpoint
    distill_from_cache(cache, student, args, resume_from_checkpoint=resume)
    if args.should_save:  # once, from the main process of a multi-process run
        click.echo(f"student saved to {args.output_dir} "
                   "(loads with AutoModelForCausalLM.from_pretrained)")


@main.command("generate")
@click.option("--model", "models", multiple=True, required=True,
              help="NAME=PATH (repeatable): a model folder, hub id, .gguf file or builtin:smollm2.")
@click.option("--prompt", default=None, help="Prompt text (or --data for a held-out document).")
@click.option("--data", default=None,
              help="Text source whose held-out split's first document starts the prompt.")
@click.option("--split", default="heldout", show_default=True)
@click.option("--prompt-tokens", type=int, default=48, show_default=True,
              help="With --data: how many tokens of the document make the prompt.")
@click.option("--max-new-tokens", type=int, default=40, show_default=True)
@click.option("--device", default="auto", show_default=True)
@_friendly_errors
def generate_cmd(models, **kwargs):
    """Continue one held-out prompt with several models (greedy), side by side."""
    from unidistill.generate import format_side_by_side, generate_side_by_side, parse_model_specs

    prompt, continuations = generate_side_by_side(parse_model_specs(list(models)), **kwargs)
    click.echo(format_side_by_side(prompt, continuations), nl=False)


@main.command("prune")
@_config_option
@click.option("--model", required=True, help="Teacher: folder, hub id, .gguf file or builtin:smollm2.")
@click.option("--gguf-file", default=None, help="GGUF file name inside --model's folder.")
@click.option("--out", required=True, help="Folder for the pruned model (+ tokenizer).")
@click.option("--drop-layers", type=int, default=0, show_default=True, help="Decoder blocks to remove.")
@click.option("--depth-method", type=click.Choice(["importance", "kl", "ppl", "last"]), default="importance",
              show_default=True,
              help="Which blocks go: importance = those whose output is most like their input (cosine "
                   "on the calibration text); kl / ppl = those whose removal alone raises the KL to the "
                   "teacher / the perplexity least (one forward pass per block over --score-sequences); "
                   "last = the last ones (ruins real models: SmolLM2 minus 6 -> perplexity 5.6e5).")
@click.option("--depth-iterative", is_flag=True,
              help="Drop one block at a time and score the rest again (n passes instead of one).")
@click.option("--score-sequences", type=int, default=4, show_default=True,
              help="Calibration sequences the kl/ppl block scores run on.")
@click.option("--heads-keep", type=float, default=1.0, show_default=True,
              help="Share of query heads kept in every key/value group (most important first).")
@click.option("--mlp-keep", type=float, default=1.0, show_default=True,
              help="Share of GLU neurons kept per block (most important first).")
@click.option("--hidden-keep", type=float, default=1.0, show_default=True,
              help="Share of residual channels kept (massive-activation ones, then most important).")
@click.option("--norm-scale", type=click.Choice(["energy", "token", "none"]), default="energy",
              show_default=True,
              help="Rescale kept RMSNorm weights by rms(kept)/rms(all) of their input: from the "
                   "energy summed over calibration tokens, the mean over tokens, or not at all.")
@click.option("--calib-data", default=None,
              help="Calibration text, any --data source of cache-build [default: builtin:pydoc_topics].")
@click.option("--calib-split", default="train", show_default=True)
@click.option("--calib-heldout-share", type=float, default=None,
              help="Local --calib-data: share of documents held out [default: 0.05].")
@click.option("--calib-sequences", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@_friendly_errors
def prune_cmd(**kwargs):
    """Make a student from a Llama-family teacher: depth, heads, MLP width and hidden-size pruning."""
    from unidistill.pruning.prune import prune

    summary = prune(**kwargs)
    click.echo(f"pruned: {summary['num_hidden_layers']} blocks, hidden {summary['hidden_size']}, "
               f"MLP {summary['intermediate_size']}, {summary['num_attention_heads']} heads; {summary['parameters_before']:,} -> "
               f"{summary['parameters_after']:,} parameters; dropped blocks "
               f"{summary['dropped_blocks']}; saved to {kwargs['out']}")


@main.command("ablate")
@_config_option
@click.option("--cache", required=True, type=click.Path(), help="The one teacher cache every run trains on.")
@click.option("--student", required=True, help="Student model folder (e.g. from unidistill prune).")
@click.option("--teacher", required=True, help="The teacher, evaluated for the recovery baseline.")
@click.option("--heldout", required=True, multiple=True,
              help="Held-out text (e.g. builtin:stdlib_docs: its heldout split). Repeatable: every "
                   "model is evaluated on each set; the table gets one block of columns per set.")
@click.option("--heldout-split", default=None, multiple=True,
              help="Split of --heldout [default: heldout for built-in text and local files]; once "
                   "for every set or once per --heldout, in the same order.")
@click.option("--heldout-cache", default=None, multiple=True, type=click.Path(),
              help="Teacher cache of held-out text: adds top-1 agreement and KL to the table; none "
                   "or one per --heldout, in the same order.")
@click.option("--heldout-name", "heldout_names", default=None, multiple=True,
              help="Names of the held-out sets, one per --heldout [default: the source without "
                   "'builtin:', or the file stem].")
@click.option("--out", required=True,
              help="Folder for the runs, ablation.json and ablation.md. Rerunning keeps what was "
                   "made with the same settings and redoes the rest; a run trained under other "
                   "settings is moved to OUT/_replaced/, not deleted.")
@click.option("--variants", "variants_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="YAML with 'common' (options of every run) and 'variants' (list of {name, ...}).")
@click.option("--variant", "variant_specs", multiple=True,
              help="NAME:key=value,... e.g. ce+kl:alpha=0.5,beta=0.5,gamma=0 (repeatable); "
                   "online=full trains against the live teacher instead of the cache.")
@click.option("--max-steps", type=int, default=None)
@click.option("--learning-rate", type=float, default=None)
@click.option("--per-device-train-batch-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--use-cpu", is_flag=True, default=None)
@click.option("--eval-sequences", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="Device for the evaluations.")
@_friendly_errors
def ablate_cmd(variants_file, variant_specs, max_steps, learning_rate, per_device_train_batch_size,
               seed, use_cpu, eval_sequences, **kwargs):
    """Several distillation runs from one cache, evaluated side by side: perplexity and next-token
    accuracy, each also as a ratio to the teacher, and the share of the log-perplexity gap closed.

    Each run and each evaluation records the settings that produced it; a rerun keeps the pieces
    whose settings match, redoes the others and says so (evaluations are redone in place; a run
    whose training settings changed is trained again and its old folder moved to OUT/_replaced/).
    """
    from unidistill.ablate import ablate, ablation_plan, format_table, read_variants_file
    from unidistill.errors import ConfigError

    spec = {}
    if variants_file:
        try:
            spec = read_variants_file(variants_file)
        except ConfigError as e:
            raise click.UsageError(str(e)) from e
    variants, common = ablation_plan(
        spec, variant_specs, max_steps=max_steps, learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size, seed=seed, use_cpu=use_cpu)
    kwargs["heldout_names"] = kwargs["heldout_names"] or None
    table = ablate(variants=variants, common=common, eval_sequences=eval_sequences or None,
                   log=lambda message: click.echo(message, err=True), **kwargs)
    click.echo(format_table(table))


@main.command("report")
@click.argument("run_dir", type=click.Path())
@_friendly_errors
def report_cmd(run_dir):
    """Plots of a run or an ablation: loss components, layer cosine heatmap, recovery bars."""
    from unidistill.report import report

    for path in report(run_dir):
        click.echo(f"wrote {path}")


@main.command("evaluate")
@_config_option
@click.option("--model", required=True, help="Model folder, hub id, .gguf file or builtin:smollm2.")
@click.option("--gguf-file", default=None, help="GGUF file name inside --model's folder.")
@click.option("--data", default=None,
              help="Held-out text for perplexity, any --data source of cache-build, e.g. "
                   "builtin:kjv_bible (English prose) beside the training domain.")
@click.option("--split", default=None,
              help="Split of --data [default: heldout for built-in text and local files and "
                   "folders, train for a hub data set]; all for a file kept apart for evaluation.")
@click.option("--heldout-share", type=float, default=None,
              help="Local --data: share of documents held out [default: 0.05], as in cache-build.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--cache", default=None, type=click.Path(),
              help="Teacher cache of held-out text: adds KL to teacher, top-1 agreement, cosines.")
@click.option("--seq-len", type=int, default=None,
              help="Packed sequence length for --data [default: the cache's, else 256].")
@click.option("--max-sequences", type=int, default=64, show_default=True,
              help="Sequences evaluated (from --data, and from --cache); 0 for all.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--output", default=None, type=click.Path(), help="Also write the JSON to this file.")
@_friendly_errors
def evaluate_cmd(as_json, output, max_sequences, **kwargs):
    """Perplexity on held-out text; with --cache, closeness to the teacher as well."""
    from unidistill.evaluate import evaluate, format_evaluation
    from unidistill.storage.files import atomic_write_bytes

    result = evaluate(max_sequences=max_sequences or None, progress=not as_json, **kwargs)
    if output:
        atomic_write_bytes(Path(output), result.to_json().encode())
    click.echo(result.to_json() if as_json else format_evaluation(result))


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
