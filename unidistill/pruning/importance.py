"""Activation statistics on calibration text, the inputs of every pruning decision.

One pass over the calibration batches collects, with forward hooks:

* per block, the mean cosine similarity between its input and output hidden states (a block
  whose output equals its input changes nothing and is the first to drop);
* per block, the mean |activation| of each GLU neuron, act(gate(x)) * up(x), the input of
  ``down_proj`` (neurons that stay near zero contribute little);
* per norm (each block's two RMSNorms and the final one), the mean square of each input channel
  (for rescaling a norm over fewer channels) and the mean |output| of each channel, whose sum
  over all norms ranks residual channels for hidden-size pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unidistill.cache_builder.capture import decoder_blocks


@dataclass
class ActivationStats:
    block_cosine: torch.Tensor            # (n_blocks,) mean cos(input, output) of each block
    mlp_activation: torch.Tensor          # (n_blocks, intermediate) mean |act(gate) * up|
    norm_input_ms: dict[str, torch.Tensor]   # norm name -> (hidden,) mean x^2 of its input
    channel_importance: torch.Tensor      # (hidden,) sum over norms of mean |norm output|
    tokens: int


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


@torch.no_grad()
def collect_stats(model, ids: np.ndarray, *, batch_size: int = 4, progress: bool = True) -> ActivationStats:
    """Run ``model`` over calibration ids (N, L) and return the activation statistics."""
    blocks = decoder_blocks(model)
    n, d = len(blocks), model.config.hidden_size
    device = next(model.parameters()).device
    cos_sum = torch.zeros(n, dtype=torch.float64)
    mlp_sum = torch.zeros(n, model.config.intermediate_size, dtype=torch.float64)
    norms = norm_modules(model)
    in_ms = {k: torch.zeros(d, dtype=torch.float64) for k in norms}
    out_abs = torch.zeros(d, dtype=torch.float64)
    hooks = []

    def block_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = _first(output)
            cos_sum[i] += F.cosine_similarity(x.float(), y.float(), dim=-1).sum().double().cpu()
        return hook

    def mlp_hook(i):
        def hook(module, args):
            mlp_sum[i] += args[0].float().abs().sum((0, 1)).double().cpu()
        return hook

    def norm_hook(name):
        def hook(module, args, output):
            in_ms[name] += args[0].float().square().sum((0, 1)).double().cpu()
            out_abs.add_(output.float().abs().sum((0, 1)).double().cpu())
        return hook

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
    for name, module in norms.items():
        hooks.append(module.register_forward_hook(norm_hook(name)))
    tokens = 0
    try:
        for s in tqdm(range(0, len(ids), batch_size), desc="calibration", disable=not progress):
            batch = torch.from_numpy(ids[s:s + batch_size].astype(np.int64)).to(device)
            model(input_ids=batch)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return ActivationStats(block_cosine=(cos_sum / tokens).float(), mlp_activation=(mlp_sum / tokens).float(),
                           norm_input_ms={k: (v / tokens).float() for k, v in in_ms.items()},
                           channel_importance=(out_abs / tokens).float(), tokens=tokens)


def least_important_blocks(stats: ActivationStats, drop: int) -> list[int]:
    """0-based blocks to keep after dropping the ``drop`` blocks whose output is most like their
    input (highest cosine), in their original order."""
    order = torch.argsort(stats.block_cosine, descending=True).tolist()
    dropped = set(order[:drop])
    return [i for i in range(len(stats.block_cosine)) if i not in dropped]
