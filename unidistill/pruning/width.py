"""Width pruning of Llama-family decoders: GLU neurons and residual (hidden) channels.

* **MLP**: in every block, keep the ``k`` neurons with the largest mean |act(gate(x)) * up(x)| on
  calibration text (the same ``k`` in every block, so the config keeps one intermediate_size):
  rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``.
* **Hidden size**: keep the residual channels with the largest summed mean |output| over all
  RMSNorms, the same channels everywhere: columns of the embeddings, of every linear that reads
  the residual (q, k, v, gate, up, and the head) and rows of every linear that writes it (o, down),
  and the entries of every norm weight. The number of heads and their size stay (``head_dim`` is
  written into the config); the kept width is a multiple of lcm(heads, 8), because transformers
  requires the hidden size to divide by the number of heads (SmolLM2's 9 heads: 576 -> 432 at
  ``--hidden-keep 0.78``). An RMSNorm over fewer channels divides by a different RMS, so each
  norm weight is rescaled by sqrt(r * D / |S|), with r the share of that norm's input energy the
  kept channels carry on the calibration text; with every channel kept this is exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from unidistill.cache_builder.capture import decoder_blocks
from unidistill.errors import ConfigError
from unidistill.pruning.importance import ActivationStats, norm_modules

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"unidistill prune supports Llama-family decoders (model_type one of "
                          f"{', '.join(SUPPORTED_TYPES)}); this model is {kind!r} "
                          f"({type(model).__name__}). Prune it with its own tooling and pass the "
                          "result to distill-from-cache as the student")


def kept_size(total: int, keep: float, what: str, multiple: int | None = None) -> int:
    """``keep`` * total, rounded to the nearest multiple of 64 from 256 up and of 8 from 64 up
    (matmul-kernel friendly sizes: 1536 * 0.67 -> 1024, 576 * 0.78 -> 448), or to the nearest
    multiple of ``multiple`` when given (the hidden size must divide by the number of heads)."""
    if not 0 < keep <= 1:
        raise ConfigError(f"{what} keep ratio is {keep}; it must be in (0, 1], e.g. 0.67 keeps "
                          "two thirds (1 keeps everything)")
    size = max(1, round(total * keep))
    if multiple:
        return min(total, max(multiple, multiple * round(size / multiple)))
    for step, floor in ((64, 256), (8, 64)):
        if size >= floor:
            size = min(total, max(floor, step * round(size / step)))
            break
    return size


def _sliced_linear(old: nn.Linear, rows=None, cols=None, scale_rows=None) -> nn.Linear:
    w = old.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data if rows is None else old.bias.data[rows])
    return new


def prune_mlp(model, stats: ActivationStats, keep: float, block_rows: Sequence[int]) -> list[list[int]]:
    """Keep the most active GLU neurons in every block; ``block_rows[i]`` is the row of ``stats``
    (teacher block) that block i came from. Returns the kept neuron indices per block."""
    blocks = decoder_blocks(model)
    k = kept_size(model.config.intermediate_size, keep, "MLP")
    kept = []
    for block, row in zip(blocks, block_rows):
        idx = torch.topk(stats.mlp_activation[row], k).indices.sort().values
        mlp = block.mlp
        device = mlp.gate_proj.weight.device
        idx_d = idx.to(device)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx_d)
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx_d)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx_d)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = k
        kept.append(idx.tolist())
    model.config.intermediate_size = k
    return kept


def prune_hidden(model, stats: ActivationStats, keep: float, block_rows: Sequence[int]) -> list[int]:
    """Keep the most important residual channels everywhere; returns their (sorted) indices."""
    config = model.config
    d = config.hidden_size
    # transformers requires hidden_size % num_attention_heads == 0; 8 keeps kernels happy
    k = kept_size(d, keep, "hidden", multiple=math.lcm(config.num_attention_heads, 8))
    channels = torch.topk(stats.channel_importance, k).indices.sort().values
    device = model.get_input_embeddings().weight.device
    s = channels.to(device)
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads

    # norms: slice and rescale for the RMS over fewer channels
    names = {"norm": "norm"}
    for i, row in enumerate(block_rows):
        for which in ("input_layernorm", "post_attention_layernorm"):
            names[f"layers.{i}.{which}"] = f"layers.{row}.{which}"
    for name, module in norm_modules(model).items():
        ms = stats.norm_input_ms[names[name]]
        share = float(ms[channels].sum() / ms.sum().clamp(min=1e-30))
        factor = math.sqrt(share * d / k)
        module.weight = nn.Parameter(module.weight.data[s] * factor)

    for block in decoder_blocks(model):
        attn, mlp = block.self_attn, block.mlp
        for proj in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, proj, _sliced_linear(getattr(attn, proj), cols=s))
        attn.o_proj = _sliced_linear(attn.o_proj, rows=s)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, cols=s)
        mlp.up_proj = _sliced_linear(mlp.up_proj, cols=s)
        mlp.down_proj = _sliced_linear(mlp.down_proj, rows=s)
        if hasattr(mlp, "hidden_size"):
            mlp.hidden_size = k

    old_embed = model.get_input_embeddings()
    embed = nn.Embedding(old_embed.num_embeddings, k, padding_idx=old_embed.padding_idx,
                         device=device, dtype=old_embed.weight.dtype)
    embed.weight.data.copy_(old_embed.weight.data[:, s])
    old_head = model.get_output_embeddings()
    tied = old_head.weight is old_embed.weight
    model.set_input_embeddings(embed)
    if tied:
        head = nn.Linear(k, old_head.out_features, bias=old_head.bias is not None, device=device,
                         dtype=old_head.weight.dtype)
        head.weight = embed.weight
        if old_head.bias is not None:
            head.bias.data.copy_(old_head.bias.data)
    else:
        head = _sliced_linear(old_head, cols=s)
    model.set_output_embeddings(head)
    config.hidden_size = k
    config.head_dim = head_dim
    return channels.tolist()
