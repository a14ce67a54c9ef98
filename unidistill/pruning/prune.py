"""``unidistill prune``: a smaller student from a teacher, in depth and width, with provenance.

The output folder is a plain Hugging Face model (``AutoModelForCausalLM.from_pretrained``) plus
the teacher's tokenizer. Its config records in ``unidistill_provenance`` which teacher block each
student block came from (``teacher_blocks``, read by the ``original`` layer map), the residual
channels kept (``hidden_channels``) and how the choice was made.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from unidistill.errors import ConfigError
from unidistill.models.layer_map import PROVENANCE_KEY
from unidistill.pruning.depth import DEPTH_METHODS, blocks_to_keep, keep_blocks
from unidistill.pruning.importance import collect_stats
from unidistill.pruning.width import check_supported, prune_heads, prune_hidden, prune_mlp


def needs_calibration(drop_layers: int, depth_method: str, mlp_keep: float, hidden_keep: float,
                      heads_keep: float = 1.0) -> bool:
    """Importance ranking and width pruning read activations on calibration text."""
    return (bool(drop_layers and depth_method != "last") or mlp_keep < 1 or hidden_keep < 1
            or heads_keep < 1)


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_model(model, *, drop_layers: int = 0, depth_method: str = "importance",
                depth_iterative: bool = False, heads_keep: float = 1.0, mlp_keep: float = 1.0,
                hidden_keep: float = 1.0, norm_scale: str = "energy", aggregation: str = "minitron",
                keep_massive: bool = True, calib_ids=None, score_sequences: int = 4,
                batch_size: int = 4, stats=None, blocks=None, progress: bool = True) -> dict:
    """Prune ``model`` in place; returns a summary (also merged into the config's provenance).

    Every width choice ranks by the teacher's activations on ``calib_ids`` (``stats``, computed
    here unless given); ``kl``/``ppl`` depth scores run on the first ``score_sequences`` of them.
    ``blocks`` (0-based, increasing) keeps exactly those blocks instead of choosing by
    ``depth_method`` and ``drop_layers``."""
    check_supported(model)
    if depth_method not in DEPTH_METHODS:
        raise ConfigError(f"--depth-method {depth_method!r} is not one of {', '.join(DEPTH_METHODS)}")
    n = model.config.num_hidden_layers
    needs_stats = needs_calibration(drop_layers, depth_method, mlp_keep, hidden_keep, heads_keep)
    if needs_stats and calib_ids is None:
        raise ConfigError("importance ranking and width pruning need calibration text (--calib-data)")
    if score_sequences < 1:
        raise ConfigError(f"--score-sequences is {score_sequences}; it must be at least 1")
    before = count_parameters(model)
    if needs_stats and stats is None:
        stats = collect_stats(model, calib_ids, batch_size=batch_size, progress=progress)
    score_ids = calib_ids[:score_sequences] if calib_ids is not None else None
    if blocks is not None:
        keep, depth_record, depth_method = list(blocks), {}, "given"
    else:
        keep, depth_record = blocks_to_keep(model, depth_method, drop_layers, iterative=depth_iterative,
                                            calib_ids=calib_ids, score_ids=score_ids,
                                            batch_size=batch_size, progress=progress)
    keep_blocks(model, keep)
    summary = {"depth_method": depth_method, "depth_iterative": depth_iterative,
               "dropped_blocks": [i for i in range(n) if i not in keep], **depth_record}
    if stats is not None:
        summary["block_cosine"] = [round(float(c), 5) for c in stats.block_cosine]
        summary["calibration_tokens"] = stats.tokens
        summary["importance_aggregation"] = aggregation
    if heads_keep < 1:
        prune_heads(model, stats, heads_keep, keep, aggregation=aggregation)
    if mlp_keep < 1:
        prune_mlp(model, stats, mlp_keep, keep, aggregation=aggregation)
    if hidden_keep < 1:
        hidden = prune_hidden(model, stats, hidden_keep, calib_ids=calib_ids, norm_scale=norm_scale,
                              aggregation=aggregation, keep_massive=keep_massive,
                              batch_size=batch_size, progress=progress)
        summary.update(hidden_channels=hidden["channels"], norm_scale=norm_scale,
                       norm_scales=hidden["norm_scales"])
    summary.update(parameters_before=before, parameters_after=count_parameters(model),
                   num_hidden_layers=model.config.num_hidden_layers,
                   num_attention_heads=model.config.num_attention_heads,
                   intermediate_size=model.config.intermediate_size,
                   hidden_size=model.config.hidden_size)
    record = dict(getattr(model.config, PROVENANCE_KEY))
    record.update(summary)
    setattr(model.config, PROVENANCE_KEY, record)
    return summary


def prune(model: str, out: str, *, drop_layers: int = 0, depth_method: str = "importance",
          depth_iterative: bool = False, heads_keep: float = 1.0, mlp_keep: float = 1.0,
          hidden_keep: float = 1.0, norm_scale: str = "energy", score_sequences: int = 4,
          calib_data: str | None = None, calib_split: str = "train",
          calib_heldout_share: float | None = None, calib_sequences: int = 16, seq_len: int = 256,
          batch_size: int = 4, device: str = "auto", gguf_file: str | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:
    """Load ``model`` (folder, hub id, GGUF or builtin), prune it and save it to ``out``."""
    from unidistill.models.loading import load_tokenizer_and_model, resolve_device, resolve_model_source
    from unidistill.text.data import (
        BUILTIN_PYDOC,
        check_data_split,
        iter_documents,
        pack_documents,
    )

    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out_dir} is not empty; choose a new --out or pass "
                          "--overwrite to replace it")
    calibrate = needs_calibration(drop_layers, depth_method, mlp_keep, hidden_keep, heads_keep)
    if calibrate:  # a bad split or share is refused before the model is loaded
        check_data_split(calib_data or BUILTIN_PYDOC, calib_split, calib_heldout_share)
    source = resolve_model_source(model, gguf_file)
    tokenizer, net = load_tokenizer_and_model(source, resolve_device(device))
    check_supported(net)
    calib_ids = None
    if calibrate:
        docs = iter_documents(calib_data or BUILTIN_PYDOC, split=calib_split,
                              heldout_share=calib_heldout_share)
        calib_ids = pack_documents(docs, tokenizer, seq_len, calib_sequences)
    summary = prune_model(net, drop_layers=drop_layers, depth_method=depth_method,
                          depth_iterative=depth_iterative, heads_keep=heads_keep, mlp_keep=mlp_keep,
                          hidden_keep=hidden_keep, norm_scale=norm_scale, calib_ids=calib_ids,
                          score_sequences=score_sequences, batch_size=batch_size, progress=progress)
    getattr(net.config, PROVENANCE_KEY)["teacher"] = model
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        net.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return summary
