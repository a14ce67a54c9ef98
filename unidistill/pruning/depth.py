"""Depth pruning: keep a subset of a decoder's blocks, recording where each came from.

The kept blocks are the teacher's own modules (no copy of their weights is altered); the config
gets the new depth and ``unidistill_provenance["teacher_blocks"]``: for each student block, the
0-based index of the teacher block it came from, composed with any earlier pruning, which the
``original`` layer map reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from unidistill.cache_builder.capture import decoder_blocks
from unidistill.errors import ConfigError
from unidistill.trainer.layer_map import PROVENANCE_BLOCKS_KEY, PROVENANCE_KEY, provenance_from_config


def last_blocks_dropped(n_layers: int, drop: int) -> list[int]:
    """0-based blocks kept when the last ``drop`` of ``n_layers`` are removed."""
    if not 0 <= drop < n_layers:
        raise ConfigError(f"cannot drop {drop} of {n_layers} decoder blocks; drop between 0 and "
                          f"{n_layers - 1} so at least one block is left")
    return list(range(n_layers - drop))


def keep_blocks(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep the 0-based blocks ``keep`` (in order) of ``model``, in place; returns ``model``."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n:
        raise ConfigError(f"blocks to keep {keep} must be a non-empty increasing list of distinct "
                          f"0-based indices below {n}")
    kept = nn.ModuleList(blocks[i] for i in keep)
    for new_index, block in enumerate(kept):  # the KV cache is indexed by layer_idx
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    base = model.get_decoder()
    for name, child in base.named_children():
        if child is blocks:
            setattr(base, name, kept)
    config = model.config
    earlier = provenance_from_config(config)
    origin = [earlier[i] for i in keep] if earlier is not None else keep
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    setattr(config, PROVENANCE_KEY, {**(getattr(config, PROVENANCE_KEY, None) or {}),
                                     PROVENANCE_BLOCKS_KEY: origin})
    return model
