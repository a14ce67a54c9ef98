"""Depth pruning: keep a subset of a decoder's blocks, recording where each came from.

The kept blocks are the teacher's own modules (no copy of their weights is altered); the config
gets the new depth and ``unidistill_provenance["teacher_blocks"]``: for each student block, the
0-based index of the teacher block it came from, composed with any earlier pruning, which the
``original`` layer map reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unidistill.errors import ConfigError
from unidistill.models.layer_map import PROVENANCE_BLOCKS_KEY, PROVENANCE_KEY, provenance_from_config
from unidistill.models.teacher import decoder_blocks


DEPTH_METHODS = ("importance", "kl", "ppl", "last")


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


class _WithoutBlocks:
    """Run ``model`` as if the 0-based blocks ``skipped`` were gone (the residual stream passes
    them untouched), without altering it: the block list and depth are swapped back on exit.
    Only for forward passes without a KV cache (layer_idx is not renumbered)."""

    def __init__(self, model: nn.Module, skipped: Sequence[int]):
        self.model, self.skipped = model, set(skipped)

    def __enter__(self):
        self.blocks = decoder_blocks(self.model)
        self.depth = self.model.config.num_hidden_layers
        self.kept = [i for i in range(len(self.blocks)) if i not in self.skipped]
        self._swap(nn.ModuleList(self.blocks[i] for i in self.kept), len(self.kept))
        return self.kept

    def __exit__(self, *exc):
        self._swap(self.blocks, self.depth)

    def _swap(self, blocks, depth):
        base = self.model.get_decoder()
        current = decoder_blocks(self.model)
        for name, child in base.named_children():
            if child is current:
                setattr(base, name, blocks)
        self.model.config.num_hidden_layers = depth


@torch.no_grad()
def _log_probs(model, ids: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(ids), batch_size):
        batch = torch.from_numpy(ids[s:s + batch_size].astype(np.int64)).to(device)
        out.append(torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1))
    return out                                               # [(B, L, V)]


@torch.no_grad()
def drop_one_scores(model, ids: np.ndarray, *, skipped: Sequence[int] = (), batch_size: int = 4,
                    reference: list[torch.Tensor] | None = None, progress: bool = True) -> dict[int, dict]:
    """For every block not in ``skipped``: what removing it (on top of ``skipped``) costs on the
    calibration ids (N, L), as ``{"kl": mean KL(reference || pruned) per token, "nll": mean next-token
    negative log-likelihood}``. ``reference`` holds the teacher's log-probs per batch (computed from
    ``model`` with nothing skipped when not given). One forward pass over ``ids`` per block."""
    if reference is None:
        reference = _log_probs(model, ids, batch_size)
    n = len(decoder_blocks(model))
    candidates = [i for i in range(n) if i not in set(skipped)]
    labels = torch.from_numpy(ids[:, 1:].astype(np.int64))
    scores = {}
    for block in tqdm(candidates, desc="drop-one scores", disable=not progress):
        with _WithoutBlocks(model, [*skipped, block]):
            pruned = _log_probs(model, ids, batch_size)
        kl = nll = 0.0
        for b, (p, q) in enumerate(zip(reference, pruned)):
            kl += float((p.exp() * (p - q)).sum(-1).sum())   # (B, L, V) -> scalar
            lab = labels[b * batch_size:(b + 1) * batch_size].to(q.device)   # (B, L-1)
            nll -= float(q[:, :-1].gather(-1, lab.unsqueeze(-1)).sum())
        scores[block] = {"kl": kl / ids.size, "nll": nll / labels.numel()}
    return scores


def blocks_to_keep(model, method: str, drop: int, *, iterative: bool = False, calib_ids=None,
                   score_ids=None, batch_size: int = 4, progress: bool = True) -> tuple[list[int], dict]:
    """Choose the blocks to keep. ``method``: ``last`` (drop the last ``drop``), ``importance``
    (drop those whose output is most like their input: highest cosine on ``calib_ids``), ``kl`` or
    ``ppl`` (drop those whose removal alone raises the KL to the teacher, or the perplexity, least
    on ``score_ids``). ``iterative`` drops one block at a time and scores the rest again with it
    gone. Returns the kept blocks and a record of the scores."""
    from unidistill.pruning.importance import collect_stats

    n = model.config.num_hidden_layers
    if method not in DEPTH_METHODS:
        raise ConfigError(f"depth method {method!r} is not one of {', '.join(DEPTH_METHODS)}")
    keep = last_blocks_dropped(n, drop)  # also checks the count
    if method == "last":
        if iterative:
            raise ConfigError("--depth-iterative re-scores blocks; it needs --depth-method importance, "
                              "kl or ppl, not last")
        return keep, {}
    if drop == 0:
        return keep, {}
    dropped: list[int] = []
    rounds = []
    reference = None
    if method in ("kl", "ppl"):
        if score_ids is None:
            raise ConfigError(f"depth method {method!r} needs calibration text to score blocks on")
        reference = _log_probs(model, score_ids, batch_size)
    elif calib_ids is None:
        raise ConfigError("depth method 'importance' needs calibration text")
    while len(dropped) < drop:
        if method == "importance":
            with _WithoutBlocks(model, dropped) as remaining:
                cos = collect_stats(model, calib_ids, batch_size=batch_size, progress=progress).block_cosine
            score = {b: float(c) for b, c in zip(remaining, cos)}       # higher: less needed
            ranked = sorted(score, key=lambda b: (-score[b], b))
        else:
            full = drop_one_scores(model, score_ids, skipped=dropped, batch_size=batch_size,
                                   reference=reference, progress=progress)
            key = "kl" if method == "kl" else "nll"
            score = {b: v[key] for b, v in full.items()}               # lower: less needed
            ranked = sorted(score, key=lambda b: (score[b], b))
        rounds.append({str(b): round(v, 5) for b, v in score.items()})
        take = 1 if iterative else drop
        dropped += ranked[:take]
    keep = [i for i in range(n) if i not in set(dropped)]
    return keep, {"block_scores": rounds, "drop_order": dropped}
