"""The hooked teacher forward: what a teacher says, before anything is stored.

Hidden states are captured by forward hooks on the chosen decoder blocks only (never all of
``output_hidden_states``), and the head (followed by the model's own logit transform, see
:mod:`unidistill.model_logits`) is applied chunk by chunk over positions so the full
[B, L, V] fp32 logits never exist at once; top-k with its tail, and sampling, happen on the
teacher's device. The cache builder (:mod:`unidistill.cache_builder.capture`) turns the results
into storage arrays; the online baseline (:mod:`unidistill.trainer.online_teacher`) feeds them to
the losses directly.

Layer indices follow Hugging Face ``hidden_states`` (:mod:`unidistill.models.layer_map`):
0 = embedding output, i = output of block i, n = last block after the final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from unidistill.errors import ConfigError
from unidistill.model_logits import (
    CHECK_POSITIONS,
    CHECK_SEQUENCES,
    LogitTransform,
    check_logit_transform,
    head_logits,
)
from unidistill.models.layer_map import check_layer_range
from unidistill.models.packing import segment_kwargs


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


def top_k_with_tail(logits: torch.Tensor, k: int, temperatures: tuple[float, ...] = ()):
    """log-probs of the k most likely ids and the log of the mass outside them, in fp32.

    logits (N, V) -> ids (N, k), logp (N, k) sorted descending, log_tail (N,), and
    tempered_tail (N, len(temperatures)) = log Σ_tail p_i^(1/T) for each T.
    ``logits`` is used as scratch space (overwritten) when it already is fp32.

    One exp pass: with m the row maximum, S_all = sum exp(z - m) and S_rest = the same sum with
    the k ids zeroed, so log_tail = log S_rest - log S_all is exact even when the top-k hold
    nearly all the mass (1 - sum(p) would cancel), and -inf when k == V.
    The tempered tail is what makes the K+1-bucket teacher exact at T != 1: with
    e_i = exp(z_i - m), p_i^(1/T) = e_i^(1/T) / S_all^(1/T), so
    log Σ_tail p_i^(1/T) = log Σ_rest e_i^(1/T) - log S_all / T. Tempering the tail bucket as one
    token (log_tail / T) instead would put T > 1 students' tails far too low.
    """
    z = logits.float()                                                    # (N, V)
    top, ids = z.topk(k, dim=-1, sorted=True)                             # (N, k)
    m = top[:, :1]                                                        # (N, 1) row max
    z.sub_(m).exp_()
    log_s_all = z.sum(-1).log()                                           # (N,)
    z.scatter_(-1, ids, 0.0)                                              # (N, V) tail only
    log_s_rest = z.sum(-1).log()                                          # (N,)
    logp = top - (m + log_s_all.unsqueeze(-1))                            # (N, k)
    tempered = [z.pow(1.0 / t).sum(-1).log() - log_s_all / t for t in temperatures]
    tempered = (torch.stack(tempered, dim=-1) if tempered
                else z.new_zeros((z.shape[0], 0)))                        # (N, M)
    return ids, logp, log_s_rest - log_s_all, tempered


def sample_with_counts(logits: torch.Tensor, n: int, generator: torch.Generator | None = None):
    """Draw ``n`` ids with replacement from softmax(logits) and keep the distinct ones with counts.

    logits (R, V) -> ids (R, n) int64, counts (R, n) int64: per row the distinct ids in ascending
    order with how often each was drawn (counts sum to n); unused slots hold id 0 and count 0;
    and logp_mean (R,) fp32 = Σ (count / n) · log p(id), the draws' mean teacher log-prob.
    counts / n is an unbiased estimate of the teacher distribution (random-sampling KD), so the
    soft cross-entropy against it is an unbiased estimate of the full one, and
    ``logp_mean - Σ (count / n) log q(id)`` one of KL(teacher || q).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)                                   # (R, V)
    draws = torch.multinomial(logp.exp(), n, replacement=True, generator=generator)    # (R, n)
    logp_mean = logp.gather(-1, draws).mean(-1)                                        # (R,)
    draws = draws.sort(dim=-1).values
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = is_new.long().cumsum(-1) - 1                                                # (R, n)
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)
    return ids, counts, logp_mean


class HookedTeacher:
    """The teacher with hooks on the chosen ``layers``: its forward without gradients, its own
    logits, their top-``k`` with tail (and the tempered tails at ``tail_temperatures``) or ``k``
    draws, ``rows_per_chunk`` positions at a time. ``k`` is the ids per position it gives: the
    cache's ``stored_k`` when building, the online teacher's ``kd_top_k`` when training.
    """

    def __init__(self, model, layers, k: int | None, *, rows_per_chunk: int = 1024,
                 tail_temperatures: tuple[float, ...] = ()):
        self.model = model
        self.layers = sorted(layers)
        self.k = k
        self.tail_temperatures = tuple(tail_temperatures)
        self.rows_per_chunk = rows_per_chunk
        self.base = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.transform = LogitTransform.from_config(model.config)  # the model's own step after its head
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

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's own fp32 logits (N, V) of final hidden rows (N, D): head, then its transform."""
        return head_logits(rows, self.head.weight, self.head.bias, self.transform)

    @torch.no_grad()
    def check_logits(self, input_ids) -> None:
        """Refuse a teacher whose ``model(ids).logits`` are not :meth:`logits` of the final state
        :meth:`forward` returns (a post-processing unidistill does not know); a few short
        sequences of ``input_ids`` (B, L) are run."""
        ids = torch.as_tensor(input_ids)[:CHECK_SEQUENCES, :CHECK_POSITIONS].long()
        final, _ = self.forward(ids.to(self.head.weight.device))
        check_logit_transform(self.model, ids, self.transform, role="teacher", final_hidden=final)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Teacher forward without gradients -> final normed hidden state (B, L, D) and the
        chosen layers ``{j: (B, L, D)}``, in the model's dtype, on its device. With
        ``document_ids`` (B, L) the row's segments are kept apart (:mod:`unidistill.models.packing`).

        ``no_grad`` rather than ``inference_mode``: the online baseline feeds these tensors into
        the student's loss, which must be able to save them for its backward pass.
        """
        self._captured.clear()
        kwargs = segment_kwargs(self.model, document_ids)
        final = self.base(input_ids=input_ids, **kwargs).last_hidden_state  # (B, L, D)
        captured = dict(self._captured)
        self._captured.clear()
        if self.n_layers in self.layers:
            captured[self.n_layers] = final
        return final, captured

    @torch.no_grad()
    def top_k_tail(self, final: torch.Tensor):
        """final hidden (B, L, D) -> ids (B, L, k) int64, logp (B, L, k) fp32, log_tail (B, L) fp32
        and the tempered tails (B, L, M) fp32 for ``tail_temperatures``, applying the head to
        ``rows_per_chunk`` positions at a time."""
        b, length = final.shape[:2]
        rows = final.reshape(b * length, -1)                                 # (B*L, D)
        parts = [top_k_with_tail(self.logits(rows[s:s + self.rows_per_chunk]), self.k,
                                 self.tail_temperatures)
                 for s in range(0, rows.shape[0], self.rows_per_chunk)]
        return tuple(torch.cat(p).reshape(b, length, *p[0].shape[1:]) for p in zip(*parts))

    @torch.no_grad()
    def sampled(self, final: torch.Tensor, seed: int):
        """final hidden (B, L, D) -> distinct sampled ids and counts, (B, L, k) each, and the
        draws' mean teacher log-prob (B, L).

        The draws use a generator seeded with ``seed``, so a batch always gets the same sample
        (a resumed build is identical to an uninterrupted one)."""
        b, length = final.shape[:2]
        rows = final.reshape(b * length, -1)                                 # (B*L, D)
        generator = torch.Generator(device=rows.device).manual_seed(seed)
        parts = [sample_with_counts(self.logits(rows[s:s + self.rows_per_chunk]), self.k, generator)
                 for s in range(0, rows.shape[0], self.rows_per_chunk)]
        return tuple(torch.cat(p).reshape(b, length, *p[0].shape[1:]) for p in zip(*parts))
