"""One teacher forward that returns exactly what the cache stores.

Hidden states are captured by forward hooks on the chosen decoder blocks only (never all of
``output_hidden_states``), the head is applied chunk by chunk over positions so the full
[B, L, V] fp32 logits never exist at once, and top-k, tail mass and dtype casts happen on the
teacher's device so only the compact results are copied to the host.

Layer indices follow Hugging Face ``hidden_states``: 0 = embedding output, i = output of block i,
n = last block after the final norm.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from unidistill.cache_builder.config import check_layer_range
from unidistill.errors import ConfigError
from unidistill.storage.layout import (
    INPUT_IDS,
    LOGIT_INDICES,
    LOGIT_TAIL,
    LOGIT_VALUES,
    hidden_key,
)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.model.layers`` in Llama-family models)."""
    n = model.config.num_hidden_layers
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"could not find the {n} decoder blocks of {type(model).__name__}; "
                      "unidistill supports decoder-only models with a ModuleList of blocks")


def _hidden_output(out):
    return out if torch.is_tensor(out) else out[0]


def top_k_with_tail(logits: torch.Tensor, k: int):
    """log-probs of the k most likely ids and the log of the mass outside them, in fp32.

    logits (N, V) -> ids (N, k), logp (N, k) sorted descending, log_tail (N,).
    ``logits`` is used as scratch space (overwritten) when it already is fp32.

    One exp pass: with m the row maximum, S_all = sum exp(z - m) and S_rest = the same sum with
    the k ids zeroed, so log_tail = log S_rest - log S_all is exact even when the top-k hold
    nearly all the mass (1 - sum(p) would cancel), and -inf when k == V.
    """
    z = logits.float()                                                    # (N, V)
    top, ids = z.topk(k, dim=-1, sorted=True)                             # (N, k)
    m = top[:, :1]                                                        # (N, 1) row max
    z.sub_(m).exp_()
    log_s_all = z.sum(-1).log()                                           # (N,)
    log_s_rest = z.scatter_(-1, ids, 0.0).sum(-1).log()                   # (N,)
    logp = top - (m + log_s_all.unsqueeze(-1))                            # (N, k)
    return ids, logp, log_s_rest - log_s_all


class TeacherRunner:
    """Runs the teacher on batches of ids and returns numpy arrays in storage dtypes."""

    def __init__(self, model, layers, top_k: int | None, *, index_dtype: np.dtype = np.int32,
                 hidden_dtype: str = "float16", rows_per_chunk: int = 1024):
        self.model = model
        self.layers = sorted(layers)
        self.top_k = top_k
        self.index_dtype = np.dtype(index_dtype)
        self.hidden_dtype = hidden_dtype
        self.rows_per_chunk = rows_per_chunk
        self.base = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.n_layers = model.config.num_hidden_layers
        check_layer_range(self.layers, self.n_layers)
        self._captured: dict[int, torch.Tensor] = {}
        blocks = decoder_blocks(model)
        self._hooks = []
        for j in self.layers:
            if j == 0:
                module = model.get_input_embeddings()
            elif j < self.n_layers:
                module = blocks[j - 1]
            else:
                continue  # the last layer is the base model's normed output
            self._hooks.append(module.register_forward_hook(self._make_hook(j)))

    def _make_hook(self, j):
        def hook(_module, _inputs, output):
            self._captured[j] = _hidden_output(output)
        return hook

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _to_storage(self, j: int, h: torch.Tensor) -> torch.Tensor:
        if self.hidden_dtype == "bfloat16":
            return h.to(torch.bfloat16).view(torch.int16)  # raw bits, stored as uint16
        h16 = h.to(torch.float16)
        if not torch.isfinite(h16).all():
            peak = h.float().abs().max().item()
            raise ConfigError(f"teacher hidden states of layer {j} reach |x| = {peak:.4g}, beyond "
                              "float16's range (65504); rebuild with --hidden-dtype bfloat16")
        return h16

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Teacher forward without gradients -> final normed hidden state (B, L, D) and the
        chosen layers ``{j: (B, L, D)}``, in the model's dtype, on its device.

        ``no_grad`` rather than ``inference_mode``: the online baseline feeds these tensors into
        the student's loss, which must be able to save them for its backward pass.
        """
        self._captured.clear()
        final = self.base(input_ids=input_ids).last_hidden_state            # (B, L, D)
        captured = dict(self._captured)
        self._captured.clear()
        if self.n_layers in self.layers:
            captured[self.n_layers] = final
        return final, captured

    @torch.no_grad()
    def top_k_tail(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """final hidden (B, L, D) -> ids (B, L, k) int64, logp (B, L, k) fp32, log_tail (B, L) fp32,
        applying the head to ``rows_per_chunk`` positions at a time."""
        b, length = final.shape[:2]
        rows = final.reshape(b * length, -1)                                 # (B*L, D)
        top_ids, top_vals, tails = [], [], []
        for s in range(0, rows.shape[0], self.rows_per_chunk):
            i, v, t = top_k_with_tail(self.head(rows[s:s + self.rows_per_chunk]), self.top_k)
            top_ids.append(i)
            top_vals.append(v)
            tails.append(t)
        return (torch.cat(top_ids).reshape(b, length, -1), torch.cat(top_vals).reshape(b, length, -1),
                torch.cat(tails).reshape(b, length))

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        device = self.head.weight.device
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(device)
        final, captured = self.forward(ids)
        top_ids, top_vals, tails = self.top_k_tail(final)
        out = {
            INPUT_IDS: input_ids.astype(np.int32, copy=False),
            LOGIT_INDICES: top_ids.to(torch.int32).cpu().numpy().astype(self.index_dtype),
            LOGIT_VALUES: top_vals.to(torch.float16).cpu().numpy(),
            LOGIT_TAIL: tails.to(torch.float16).cpu().numpy(),
        }
        for j in self.layers:
            stored = self._to_storage(j, captured[j]).cpu().numpy()
            out[hidden_key(j)] = stored.view(np.uint16) if self.hidden_dtype == "bfloat16" else stored
        return out
