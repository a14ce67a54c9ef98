"""Width pruning of Llama-family decoders: query heads, GLU neurons and residual (hidden) channels.

Every choice ranks by the teacher's activation importance on calibration text
(:mod:`unidistill.pruning.importance`, Minitron's mean-over-sequence, L2-over-batch by default):

* **Heads**: with grouped-query attention every key/value head serves ``g`` query heads; the same
  number of query heads is kept in every group (so the config keeps one ``num_attention_heads``
  and ``repeat_kv`` still lines queries up with their keys), the most important within each group:
  rows of ``q_proj`` and columns of ``o_proj``. Key/value heads all stay (dropping a whole group
  would take its queries with it; SmolLM2 has only 3).
* **MLP**: in every block, keep the ``k`` most important neurons (the same ``k`` in every block,
  so the config keeps one intermediate_size): rows of ``gate_proj``/``up_proj``, columns of
  ``down_proj``.
* **Hidden size**: keep the most important residual channels, the same channels everywhere:
  columns of the embeddings, of every linear that reads the residual (q, k, v, gate, up, and the
  head) and rows of every linear that writes it (o, down), and the entries of every norm weight.
  Channels carrying massive activations (largest |x| far above the other channels', as in
  SmolLM2's layers 12-24) are always kept. The head size stays (``head_dim`` is written into the
  config); the kept width is a multiple of lcm(heads, 8) (SmolLM2's 9 heads: 576 -> 432 at 0.78).
  An RMSNorm over fewer channels divides by a different RMS: see :data:`NORM_SCALES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from unidistill.errors import ConfigError
from unidistill.models.teacher import decoder_blocks
from unidistill.pruning.importance import ActivationStats, head_dim_of, kept_rms_ratios, norm_modules

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: How each kept norm weight is rescaled when residual channels go. ``none``: sliced only;
#: ``energy``: times sqrt(r D / k), r the share of the norm input's energy (summed over all
#: calibration tokens) on the kept channels; ``token``: times the mean over calibration tokens of
#: each token's own rms_kept / rms_all (what gives that token back its teacher values).
NORM_SCALES = ("none", "energy", "token")

#: A channel whose largest |residual| on calibration text is this many times the median
#: channel's largest |residual| carries massive activations and is always kept.
MASSIVE_RATIO = 20.0


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


def _sliced_linear(old: nn.Linear, rows=None, cols=None) -> nn.Linear:
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


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores``, sorted (ties: the lower index first)."""
    return torch.topk(scores.double(), k, sorted=True).indices.sort().values


def prune_heads(model, stats: ActivationStats, keep: float, block_rows: Sequence[int], *,
                aggregation: str = "minitron") -> list[list[int]]:
    """Keep round(g * keep) query heads in each group of ``g`` sharing a key/value head, the most
    important first; ``block_rows[i]`` is the row of ``stats`` (teacher block) block i came from.
    Returns the kept query-head indices per block."""
    if not 0 < keep <= 1:
        raise ConfigError(f"heads keep ratio is {keep}; it must be in (0, 1], e.g. 0.67 keeps two "
                          "of every three query heads")
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv
    per_group = max(1, round(group * keep))
    head_dim = head_dim_of(config)
    importance = stats.head_importance(aggregation)
    kept = []
    for block, row in zip(decoder_blocks(model), block_rows):
        scores = importance[row].view(kv, group)                       # (KV, g)
        chosen = [g * group + j for g in range(kv) for j in _top(scores[g], per_group).tolist()]
        attn = block.self_attn
        dims = torch.tensor([h * head_dim + t for h in chosen for t in range(head_dim)],
                            device=attn.q_proj.weight.device)
        attn.q_proj = _sliced_linear(attn.q_proj, rows=dims)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=dims)
        attn.num_key_value_groups = per_group
        if hasattr(attn, "num_heads"):
            attn.num_heads = kv * per_group
        kept.append(chosen)
    config.head_dim = head_dim
    config.num_attention_heads = kv * per_group
    return kept


def prune_mlp(model, stats: ActivationStats, keep: float, block_rows: Sequence[int], *,
              aggregation: str = "minitron") -> list[list[int]]:
    """Keep the most important GLU neurons in every block; ``block_rows[i]`` is the row of ``stats``
    (teacher block) that block i came from. Returns the kept neuron indices per block."""
    blocks = decoder_blocks(model)
    k = kept_size(model.config.intermediate_size, keep, "MLP")
    importance = stats.mlp_importance(aggregation)
    kept = []
    for block, row in zip(blocks, block_rows):
        idx = _top(importance[row], k)
        mlp = block.mlp
        idx_d = idx.to(mlp.gate_proj.weight.device)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx_d)
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx_d)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx_d)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = k
        kept.append(idx.tolist())
    model.config.intermediate_size = k
    return kept


def massive_channels(stats: ActivationStats, ratio: float = MASSIVE_RATIO) -> list[int]:
    """Residual channels whose largest |x| is at least ``ratio`` times the median channel's."""
    peak = stats.channel_max
    return torch.nonzero(peak >= ratio * peak.median()).flatten().tolist()


def choose_channels(stats: ActivationStats, k: int, *, aggregation: str = "minitron",
                    keep_massive: bool = True) -> torch.Tensor:
    """The ``k`` residual channels to keep (sorted): the massive-activation ones first (when
    ``keep_massive``), then the most important."""
    scores = stats.channel_importance(aggregation).double().clone()
    if keep_massive:
        massive = massive_channels(stats)
        if len(massive) > k:
            raise ConfigError(f"{len(massive)} residual channels carry massive activations but only "
                              f"{k} are kept; raise --hidden-keep")
        scores[massive] = math.inf
    return _top(scores, k)


def norm_scale_factors(model, channels: torch.Tensor, norm_scale: str, calib_ids: np.ndarray | None,
                       *, batch_size: int = 4, progress: bool = True) -> dict[str, float]:
    """Per norm of ``model``, the factor its kept weights are multiplied by (see NORM_SCALES)."""
    if norm_scale not in NORM_SCALES:
        raise ConfigError(f"norm scale {norm_scale!r} is not one of {', '.join(NORM_SCALES)}")
    if norm_scale == "none":
        return {name: 1.0 for name in norm_modules(model)}
    if calib_ids is None:
        raise ConfigError(f"norm scale {norm_scale!r} reads calibration text; pass calib_ids or use 'none'")
    ratios = kept_rms_ratios(model, calib_ids, channels, batch_size=batch_size, progress=progress)
    return {name: r[norm_scale] for name, r in ratios.items()}


def prune_hidden(model, stats: ActivationStats, keep: float, *, calib_ids: np.ndarray | None = None,
                 norm_scale: str = "energy", aggregation: str = "minitron", keep_massive: bool = True,
                 batch_size: int = 4, progress: bool = True) -> dict:
    """Keep the most important residual channels everywhere. ``stats`` (the teacher's) choose them;
    the norm factors are measured on ``model`` as it is now (after any depth/MLP pruning) over
    ``calib_ids``. Returns ``{"channels": sorted kept indices, "norm_scales": {norm: factor}}``."""
    config = model.config
    d = config.hidden_size
    # transformers requires hidden_size % num_attention_heads == 0; 8 keeps kernels happy
    k = kept_size(d, keep, "hidden", multiple=math.lcm(config.num_attention_heads, 8))
    channels = choose_channels(stats, k, aggregation=aggregation, keep_massive=keep_massive)
    factors = norm_scale_factors(model, channels, norm_scale, calib_ids, batch_size=batch_size,
                                 progress=progress)
    device = model.get_input_embeddings().weight.device
    s = channels.to(device)
    head_dim = head_dim_of(config)

    for name, module in norm_modules(model).items():
        module.weight = nn.Parameter(module.weight.data[s] * factors[name])

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
    return {"channels": channels.tolist(), "norm_scales": {n: round(f, 6) for n, f in factors.items()}}
