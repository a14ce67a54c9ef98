"""Activation statistics on calibration text, the inputs of every pruning decision.

One pass over the calibration batches collects, with forward hooks:

* per block, the mean cosine similarity between its input and output hidden states (a block
  whose output equals its input changes nothing and is the first to drop);
* per block, the importance of each GLU neuron, act(gate(x)) * up(x) (the input of
  ``down_proj``), and of each query head (the L2 norm over ``head_dim`` of its attention output,
  the input of ``o_proj``);
* per residual channel, the importance of its RMSNorm outputs over every norm (each block's two
  and the final one), the mean square of each norm's input channel and its largest |input|
  (massive-activation channels).

Importance follows Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and
Knowledge Distillation"; NVIDIA ModelOpt's hooks): for each sequence the mean |activation| over
its positions, then the L2 norm of those means over the sequences (the paper found mean over
the sequence, L2 over the batch the best pair). For a residual channel the L2 norm runs over
the sequences of every norm together. ``aggregation="mean"`` gives the plain mean |activation|
over all tokens instead (what this module computed before), kept for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unidistill.errors import ConfigError
from unidistill.models.teacher import decoder_blocks

AGGREGATIONS = ("minitron", "mean")


@dataclass
class ActivationStats:
    block_cosine: torch.Tensor            # (n_blocks,) mean cos(input, output) of each block
    mlp_l2: torch.Tensor                  # (n_blocks, intermediate) L2_batch(mean_seq |act * up|)
    mlp_mean: torch.Tensor                # (n_blocks, intermediate) mean |act * up| over tokens
    head_l2: torch.Tensor                 # (n_blocks, heads) L2_batch(mean_seq ||head output||)
    head_mean: torch.Tensor               # (n_blocks, heads) mean ||head output|| over tokens
    channel_l2: torch.Tensor              # (hidden,) L2 over (norm, sequence) of mean_seq |norm out|
    channel_mean: torch.Tensor            # (hidden,) sum over norms of mean |norm output|
    channel_max: torch.Tensor             # (hidden,) largest |norm input| (the residual stream)
    norm_input_ms: dict[str, torch.Tensor]   # norm name -> (hidden,) mean x^2 of its input
    tokens: int
    sequences: int

    def mlp_importance(self, aggregation: str = "minitron") -> torch.Tensor:
        return self.mlp_l2 if _check_aggregation(aggregation) == "minitron" else self.mlp_mean

    def head_importance(self, aggregation: str = "minitron") -> torch.Tensor:
        return self.head_l2 if _check_aggregation(aggregation) == "minitron" else self.head_mean

    def channel_importance(self, aggregation: str = "minitron") -> torch.Tensor:
        return self.channel_l2 if _check_aggregation(aggregation) == "minitron" else self.channel_mean


def _check_aggregation(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"importance aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    return aggregation


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def norm_modules(model) -> dict[str, torch.nn.Module]:
    """Every RMSNorm on the residual stream: ``layers.<i>.input_layernorm``,
    ``layers.<i>.post_attention_layernorm`` and the final ``norm``, by name."""
    blocks = decoder_blocks(model)
    norms = {}
    for i, block in enumerate(blocks):
        norms[f"layers.{i}.input_layernorm"] = block.input_layernorm
        norms[f"layers.{i}.post_attention_layernorm"] = block.post_attention_layernorm
    norms["norm"] = model.get_decoder().norm
    return norms


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _batches(ids: np.ndarray, batch_size: int, device, progress: bool, desc: str):
    for s in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not progress):
        yield torch.from_numpy(ids[s:s + batch_size].astype(np.int64)).to(device)


def _seq_stats(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (B, S, C) activations -> (sum over sequences of (mean_seq |a|)^2, sum over tokens of |a|),
    both (C,) float64 on the CPU."""
    a = a.float().abs()
    per_seq = a.mean(1)                                      # (B, C)
    return per_seq.square().sum(0).double().cpu(), a.sum((0, 1)).double().cpu()


class _Accumulator:
    """The running sums of one calibration pass, filled by forward hooks on ``model``."""

    def __init__(self, model):
        config = model.config
        self.blocks, self.norms = decoder_blocks(model), norm_modules(model)
        n, d, inter = len(self.blocks), config.hidden_size, config.intermediate_size
        self.heads, self.head_dim = config.num_attention_heads, head_dim_of(config)
        f64 = dict(dtype=torch.float64)
        self.cos_sum = torch.zeros(n, **f64)
        self.mlp_sq, self.mlp_abs = torch.zeros(n, inter, **f64), torch.zeros(n, inter, **f64)
        self.head_sq, self.head_abs = torch.zeros(n, self.heads, **f64), torch.zeros(n, self.heads, **f64)
        self.in_ms = {k: torch.zeros(d, **f64) for k in self.norms}
        self.ch_sq, self.ch_abs = torch.zeros(d, **f64), torch.zeros(d, **f64)
        self.ch_max = torch.zeros(d, **f64)

    def _block_hook(self, i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = _first(output)
            self.cos_sum[i] += F.cosine_similarity(x.float(), y.float(), dim=-1).sum().double().cpu()
        return hook

    def _mlp_hook(self, i):
        def hook(module, args):
            sq, ab = _seq_stats(args[0])                     # (B, S, I) -> (I,)
            self.mlp_sq[i] += sq
            self.mlp_abs[i] += ab
        return hook

    def _head_hook(self, i):
        def hook(module, args):
            x = args[0]                                      # (B, S, H * head_dim)
            per_head = x.float().unflatten(-1, (self.heads, self.head_dim)).norm(dim=-1)  # (B, S, H)
            sq, ab = _seq_stats(per_head)
            self.head_sq[i] += sq
            self.head_abs[i] += ab
        return hook

    def _norm_hook(self, name):
        def hook(module, args, output):
            x = args[0].float()                              # (B, S, D)
            self.in_ms[name] += x.square().sum((0, 1)).double().cpu()
            torch.maximum(self.ch_max, x.abs().amax((0, 1)).double().cpu(), out=self.ch_max)
            sq, ab = _seq_stats(output)
            self.ch_sq.add_(sq)
            self.ch_abs.add_(ab)
        return hook

    def register(self) -> list:
        """Register every hook; returns their handles."""
        hooks = []
        for i, block in enumerate(self.blocks):
            hooks.append(block.register_forward_hook(self._block_hook(i), with_kwargs=True))
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(self._mlp_hook(i)))
            hooks.append(block.self_attn.o_proj.register_forward_pre_hook(self._head_hook(i)))
        for name, module in self.norms.items():
            hooks.append(module.register_forward_hook(self._norm_hook(name)))
        return hooks

    def stats(self, tokens: int, sequences: int) -> ActivationStats:
        return ActivationStats(
            block_cosine=(self.cos_sum / tokens).float(),
            mlp_l2=self.mlp_sq.sqrt().float(), mlp_mean=(self.mlp_abs / tokens).float(),
            head_l2=self.head_sq.sqrt().float(), head_mean=(self.head_abs / tokens).float(),
            channel_l2=self.ch_sq.sqrt().float(), channel_mean=(self.ch_abs / tokens).float(),
            channel_max=self.ch_max.float(),
            norm_input_ms={k: (v / tokens).float() for k, v in self.in_ms.items()},
            tokens=tokens, sequences=sequences)


@torch.no_grad()
def collect_stats(model, ids: np.ndarray, *, batch_size: int = 4, progress: bool = True) -> ActivationStats:
    """Run ``model`` over calibration ids (N, L) and return the activation statistics."""
    if ids is None or len(ids) == 0:
        raise ConfigError("activation statistics need at least one calibration sequence")
    device = next(model.parameters()).device
    sums = _Accumulator(model)
    tokens = _run_hooked(model, ids, sums.register(), batch_size, device, progress, "calibration")
    return sums.stats(tokens, len(ids))


def _run_hooked(model, ids: np.ndarray, hooks: list, batch_size: int, device, progress: bool,
                desc: str) -> int:
    """Run ``model`` over the calibration ``ids`` with ``hooks`` registered (removed afterwards,
    even on an error); returns the number of tokens seen."""
    tokens = 0
    try:
        for batch in _batches(ids, batch_size, device, progress, desc):
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return tokens


@torch.no_grad()
def kept_rms_ratios(model, ids: np.ndarray, channels: torch.Tensor, *, batch_size: int = 4,
                    progress: bool = True) -> dict[str, dict[str, float]]:
    """For every norm of ``model``: how the RMS over the kept ``channels`` compares with the RMS
    over all channels of its input, on calibration text.

    An RMSNorm over the kept channels S divides x_S by rms_S(x) instead of rms(x); multiplying its
    weight by c = rms_S(x) / rms(x) = sqrt(r * D / |S|), with r = sum_S x^2 / sum x^2, gives back
    the teacher's normalised values on S for that token. Returns per norm ``energy`` (c from r
    taken as a ratio of sums over all tokens, dominated by the tokens with the largest norm) and
    ``token`` (the mean over tokens of each token's own c).
    """
    norms = norm_modules(model)
    d, k = model.config.hidden_size, len(channels)
    device = next(model.parameters()).device
    s = channels.to(device)
    kept_sq = {n: 0.0 for n in norms}
    all_sq = {n: 0.0 for n in norms}
    c_sum = {n: 0.0 for n in norms}
    hooks = []

    def hook_for(name):
        def hook(module, args, output):
            x2 = args[0].double().square()                   # (B, S, D)
            kept, total = x2[..., s].sum(-1), x2.sum(-1)     # (B, S)
            kept_sq[name] += float(kept.sum())
            all_sq[name] += float(total.sum())
            c_sum[name] += float((kept / total.clamp(min=1e-300) * d / k).sqrt().sum())
        return hook

    for name, module in norms.items():
        hooks.append(module.register_forward_hook(hook_for(name)))
    tokens = _run_hooked(model, ids, hooks, batch_size, device, progress, "norm scales")
    return {n: {"energy": (kept_sq[n] / max(all_sq[n], 1e-300) * d / k) ** 0.5,
                "token": c_sum[n] / tokens} for n in norms}


def least_important_blocks(stats: ActivationStats, drop: int) -> list[int]:
    """0-based blocks to keep after dropping the ``drop`` blocks whose output is most like their
    input (highest cosine), in their original order."""
    order = torch.argsort(stats.block_cosine, descending=True).tolist()
    dropped = set(order[:drop])
    return [i for i in range(len(stats.block_cosine)) if i not in dropped]
