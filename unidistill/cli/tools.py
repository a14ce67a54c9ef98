"""``generate``, ``prune``, ``evaluate`` and ``report``: the tools around a distillation."""

from __future__ import annotations

from pathlib import Path

import click

from unidistill.cli.common import config_option, friendly_errors


@click.command("generate")
@click.option("--model", "models", multiple=True, required=True,
              help="NAME=PATH (repeatable): a model folder, hub id, .gguf file or builtin:smollm2.")
@click.option("--prompt", default=None, help="Prompt text (or --data for a held-out document).")
@click.option("--data", default=None,
              help="Text source whose held-out split's first document starts the prompt; with "
                   "--messages-field, a source of conversations (builtin:python_qa, a file, a hub id).")
@click.option("--split", default="heldout", show_default=True)
@click.option("--prompt-tokens", type=int, default=None,
              help="With --data (plain text): how many tokens of the document make the prompt "
                   "[default: 48].")
@click.option("--messages-field", default=None,
              help="The column holding each row's conversation: each model answers the held-out "
                   "conversations' last assistant turn, beside the reference answer.")
@click.option("--n-prompts", type=int, default=None,
              help="With --messages-field: how many held-out conversations (the first N) "
                   "[default: 3].")
@click.option("--max-new-tokens", type=int, default=40, show_default=True,
              help="At most this many new tokens; a chat answer stops earlier at its stop token.")
@click.option("--device", default="auto", show_default=True)
@friendly_errors
def generate_cmd(models, **kwargs):
    """Continue one held-out prompt with several models (greedy), side by side; with
    --messages-field, answer held-out conversations beside their reference answers."""
    from unidistill.generate import (
        DEFAULT_N_PROMPTS,
        format_chat_side_by_side,
        format_side_by_side,
        generate_side_by_side,
        parse_model_specs,
    )

    result = generate_side_by_side(parse_model_specs(list(models)), **kwargs)
    if kwargs["messages_field"] is not None:
        click.echo(format_chat_side_by_side(result, asked=kwargs["n_prompts"] or DEFAULT_N_PROMPTS),
                   nl=False)
        return
    prompt, continuations = result
    click.echo(format_side_by_side(prompt, continuations), nl=False)


@click.command("prune")
@config_option
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
@friendly_errors
def prune_cmd(**kwargs):
    """Make a student from a Llama-family teacher: depth, heads, MLP width and hidden-size pruning."""
    from unidistill.pruning.prune import prune

    summary = prune(**kwargs)
    click.echo(f"pruned: {summary['num_hidden_layers']} blocks, hidden {summary['hidden_size']}, "
               f"MLP {summary['intermediate_size']}, {summary['num_attention_heads']} heads; {summary['parameters_before']:,} -> "
               f"{summary['parameters_after']:,} parameters; dropped blocks "
               f"{summary['dropped_blocks']}; saved to {kwargs['out']}")


@click.command("evaluate")
@config_option
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
@click.option("--num-workers", type=int, default=1, show_default=True,
              help="DataLoader worker processes reading --cache ahead of the scoring (0: none).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--output", default=None, type=click.Path(), help="Also write the JSON to this file.")
@friendly_errors
def evaluate_cmd(as_json, output, max_sequences, **kwargs):
    """Perplexity on held-out text; with --cache, closeness to the teacher as well."""
    from unidistill.evaluate import evaluate, format_evaluation
    from unidistill.storage.files import atomic_write_bytes

    result = evaluate(max_sequences=max_sequences or None, progress=not as_json, **kwargs)
    if output:
        atomic_write_bytes(Path(output), result.to_json().encode())
    click.echo(result.to_json() if as_json else format_evaluation(result))


@click.command("report")
@click.argument("run_dir", type=click.Path())
@friendly_errors
def report_cmd(run_dir):
    """Plots of a run or an ablation: loss components, layer cosine heatmap, recovery bars."""
    from unidistill.report import report

    for path in report(run_dir):
        click.echo(f"wrote {path}")
