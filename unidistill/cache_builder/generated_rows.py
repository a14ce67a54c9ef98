"""``cache-build --generate``: the rows of a unit are made by the teacher answering its prompts.

The build's loop asks for each unit's rows (``_Build.unit_rows(start, stop)``); a reference cache
slices its packed rows there, a generated one calls :meth:`TeacherGeneration.unit_rows`, which
generates the unit's answers (:func:`~unidistill.cache_builder.generation.generate_unit`, batches
of ``--batch-size`` from the unit's first row, each seeded by its first row) and returns
``prompt + answer`` rows. The cached targets then come from the same hooked teacher forward as in
a reference cache (design 2.6: the forward on the right-padded row does not depend on the batch's
composition, and it gives the hidden states too). A stopped build regenerates its unfinished
units with the same seeds, so the resumed cache equals an uninterrupted one on the same machine.

Before the first unit, :meth:`TeacherGeneration.check` answers the first prompts once more with
generate's raw logits kept, runs the plain forward over prompt + answer and records the largest
``|log_softmax(generate's logits) - forward log-probs|`` over the answer positions and the whole
vocabulary (``build.generation.max_abs_logp``): the cached distribution is the one the answers
were drawn from.
"""

from __future__ import annotations

import numpy as np
import torch

from unidistill.cache_builder.generation import generate_batch, generate_unit, max_logp_gap, unit_rows
from unidistill.models.packing import segment_kwargs
from unidistill.text.packing import PackedTokens

CHECK_ROWS = 2  # prompts answered again for the check (their full-vocabulary log-probs are kept)


class TeacherGeneration:
    """The teacher answering one build's prompts (``prepared.prompts``)."""

    def __init__(self, cfg, prepared, model, device: torch.device):
        self.cfg, self.prompts, self.model = cfg, prepared.prompts, model
        self.decoding = cfg.decoding
        self.config = self.decoding.generation_config(prepared.tokenizer, model)
        self.settings = {"prompts": prepared.data_settings["prompts"],
                         **self.decoding.to_dict(prepared.tokenizer, model),
                         "device_type": device.type}

    def unit_rows(self, start: int, stop: int) -> PackedTokens:
        unit = generate_unit(self.model, self.prompts, start, stop, self.decoding, self.config,
                             seq_len=self.cfg.seq_len, train_on=self.cfg.resolved_train_on)
        return PackedTokens(unit.input_ids, unit.target, unit.document_ids, unit.stats)

    @torch.no_grad()
    def check(self, log) -> dict:
        """Answer the first ``CHECK_ROWS`` prompts with generate's raw logits kept, and compare
        them with the forward's log-probs at every answer position."""
        prompts = [list(p) for p in self.prompts.ids[:CHECK_ROWS]]
        batch = generate_batch(self.model, prompts, self.config, seed=self.decoding.batch_seed(0),
                               first_index=0, check=True)
        ids, _, docs = unit_rows(prompts, batch.answers, 0, self.cfg.seq_len,
                                 self.config.pad_token_id)
        device = next(self.model.parameters()).device
        docs_t = torch.from_numpy(docs).to(device)
        logits = self.model(input_ids=torch.from_numpy(ids.astype(np.int64)).to(device),
                            **segment_kwargs(self.model, docs_t)).logits
        gap = max_logp_gap(batch.raw_logits, batch.prompt_lengths, [len(a) for a in batch.answers],
                           torch.log_softmax(logits.float(), dim=-1).cpu())
        log(f"generation check: generate's log-probs and the teacher forward's differ by at most "
            f"{gap:.2e} nats over {sum(map(len, batch.answers))} answer tokens")
        return {"max_abs_logp": gap, "check_rows": len(prompts),
                "prompts": len(self.prompts.ids), "dropped_prompts": self.prompts.dropped}
