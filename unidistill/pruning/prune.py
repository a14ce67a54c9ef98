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
from unidistill.pruning.depth import keep_blocks, last_blocks_dropped
from unidistill.pruning.importance import collect_stats, least_important_blocks
from unidistill.pruning.width import check_supported, prune_hidden, prune_mlp
from unidistill.trainer.layer_map import PROVENANCE_KEY

DEPTH_METHODS = ("last", "importance")


def needs_calibration(drop_layers: int, depth_method: str, mlp_keep: float, hidden_keep: float) -> bool:
    """Importance ranking and width pruning read activations on calibration text."""
    return bool(drop_layers and depth_method == "importance") or mlp_keep < 1 or hidden_keep < 1


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_model(model, *, drop_layers: int = 0, depth_method: str = "last", mlp_keep: float = 1.0,
                hidden_keep: float = 1.0, calib_ids=None, batch_size: int = 4,
                progress: bool = True) -> dict:
    """Prune ``model`` in place; returns a summary (also merged into the config's provenance)."""
    check_supported(model)
    if depth_method not in DEPTH_METHODS:
        raise ConfigError(f"--depth-method {depth_method!r} is not one of {', '.join(DEPTH_METHODS)}")
    n = model.config.num_hidden_layers
    needs_stats = needs_calibration(drop_layers, depth_method, mlp_keep, hidden_keep)
    if needs_stats and calib_ids is None:
        raise ConfigError("importance ranking and width pruning need calibration text (--calib-data)")
    before = count_parameters(model)
    stats = collect_stats(model, calib_ids, batch_size=batch_size, progress=progress) if needs_stats else None
    keep = last_blocks_dropped(n, drop_layers)  # also checks the count
    if drop_layers and depth_method == "importance":
        keep = least_important_blocks(stats, drop_layers)
    keep_blocks(model, keep)
    summary = {"depth_method": depth_method, "dropped_blocks": [i for i in range(n) if i not in keep]}
    if stats is not None:
        summary["block_cosine"] = [round(float(c), 5) for c in stats.block_cosine]
        summary["calibration_tokens"] = stats.tokens
    if mlp_keep < 1:
        prune_mlp(model, stats, mlp_keep, keep)
    if hidden_keep < 1:
        summary["hidden_channels"] = prune_hidden(model, stats, hidden_keep, keep)
    summary.update(parameters_before=before, parameters_after=count_parameters(model),
                   num_hidden_layers=model.config.num_hidden_layers,
                   intermediate_size=model.config.intermediate_size,
                   hidden_size=model.config.hidden_size)
    record = dict(getattr(model.config, PROVENANCE_KEY))
    record.update(summary)
    setattr(model.config, PROVENANCE_KEY, record)
    return summary


def prune(model: str, out: str, *, drop_layers: int = 0, depth_method: str = "last",
          mlp_keep: float = 1.0, hidden_keep: float = 1.0, calib_data: str | None = None,
          calib_split: str = "train", calib_heldout_share: float | None = None,
          calib_sequences: int = 16, seq_len: int = 256,
          batch_size: int = 4, device: str = "auto", gguf_file: str | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:
    """Load ``model`` (folder, hub id, GGUF or builtin), prune it and save it to ``out``."""
    from unidistill.cache_builder.data import (
        BUILTIN_PYDOC,
        check_data_split,
        iter_documents,
        pack_documents,
    )
    from unidistill.cache_builder.teacher import (
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_model_source,
    )

    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out_dir} is not empty; choose a new --out or pass "
                          "--overwrite to replace it")
    calibrate = needs_calibration(drop_layers, depth_method, mlp_keep, hidden_keep)
    if calibrate:  # a bad split or share is refused before the model is loaded
        check_data_split(calib_data or BUILTIN_PYDOC, calib_split, calib_heldout_share)
    source = resolve_model_source(model, gguf_file)
    tokenizer = load_tokenizer(source)
    net = load_model(source, "float32", str(resolve_device(device)))
    check_supported(net)
    calib_ids = None
    if calibrate:
        docs = iter_documents(calib_data or BUILTIN_PYDOC, split=calib_split,
                              heldout_share=calib_heldout_share)
        calib_ids = pack_documents(docs, tokenizer, seq_len, calib_sequences)
    summary = prune_model(net, drop_layers=drop_layers, depth_method=depth_method, mlp_keep=mlp_keep,
                          hidden_keep=hidden_keep, calib_ids=calib_ids, batch_size=batch_size,
                          progress=progress)
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
