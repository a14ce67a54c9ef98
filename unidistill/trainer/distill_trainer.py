"""``UniversalDistillationTrainer``: a Hugging Face Trainer that distills from a teacher cache.

It only wires the building blocks: targets come from the batch (cache) or from an online
teacher, the loss terms from ``losses``, the hidden-state pairs from the layer map and the
projectors. Projectors are trained with the student, saved as ``projectors.safetensors`` +
``projectors.json`` beside every checkpoint and the final model, and restored on resume.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from unidistill.model_logits import LogitTransform
from unidistill.trainer.dataset import hidden_field
from unidistill.trainer.losses import (
    LossTerms,
    fused_logit_loss,
    hidden_state_loss,
    masked_mean,
    next_token_labels,
)
from unidistill.trainer.projectors import HiddenProjectors, load_projectors, save_projectors
from unidistill.trainer.run_record import write_run_record


def _exact_teacher(batch: dict):
    """(final hidden, head weight, head bias) from an online full-vocabulary teacher or an
    exact-logits cache."""
    if "teacher_final_hidden" not in batch:
        return None
    return batch["teacher_final_hidden"], batch["teacher_head_weight"], batch.get("teacher_head_bias")


class _ZeroProjectorGrads(TrainerCallback):
    """The Trainer zeroes only the model's gradients after each optimizer step; without this the
    projectors' gradients would accumulate across steps."""

    def __init__(self, projectors: HiddenProjectors):
        self.projectors = projectors

    def on_step_end(self, args, state, control, **kwargs):
        self.projectors.zero_grad(set_to_none=True)


class UniversalDistillationTrainer(Trainer):
    """Trainer whose loss is alpha*CE + beta*T^2*KL + gamma*hidden against cached targets.

    ``hidden_pairs`` maps each aligned student block to its teacher layer (hidden_states
    indices); ``projectors`` bring student widths to the teacher's. ``online_teacher``, if given,
    is a callable ``input_ids -> dict of teacher fields`` that replaces the cached targets (the
    baseline with the teacher in memory). ``teacher_head`` = (weight, bias, logit transform) of an
    exact-logits cache (``CacheReader.head``), through which the cached final teacher state gives
    the full-vocabulary logits. The student's logits are its head followed by its own
    :class:`~unidistill.model_logits.LogitTransform` (read from its config).
    """

    def __init__(self, *args, projectors: HiddenProjectors, hidden_pairs: dict[int, int],
                 online_teacher=None, teacher_head=None, run_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projectors = projectors.to(self.args.device)
        self.add_callback(_ZeroProjectorGrads(self.projectors))
        self.hidden_pairs = dict(sorted(hidden_pairs.items()))
        self.online_teacher = online_teacher
        self.teacher_head = teacher_head  # exact-logits caches: (weight, bias, transform) on the device
        self.student_logit_transform = LogitTransform.from_config(self.model.config)
        self.run_record = run_record  # unidistill_run.json: copied beside every checkpoint
        # compute_loss returns a per-micro-batch mean, so the Trainer must divide by the
        # gradient-accumulation steps itself.
        self.loss_is_scaled_for_ga = False
        self._term_sums = {"ce": 0.0, "kl": 0.0, "hidden": 0.0}
        self._term_counts = dict.fromkeys(self._term_sums, 0)
        self._no_logits = torch.zeros(0, dtype=torch.long)

    # -- optimizer: student parameters as the Trainer makes them, plus the projectors ---------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        params = [p for p in self.projectors.parameters() if p.requires_grad]
        if params and not any(any(p is q for q in g["params"]) for g in optimizer.param_groups
                              for p in params[:1]):
            lr = self.args.projector_learning_rate or self.args.learning_rate
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
        return optimizer

    # -- data parallel: the projectors are outside the DDP-wrapped model ---------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the micro-batch on which DDP syncs the model
            self._average_projector_grads()
        return loss

    def _average_projector_grads(self) -> None:
        """Average the projectors' gradients over the processes, as DDP does the student's.

        DDP all-reduces only the parameters of the model it wraps; the projectors live beside
        it (so the saved model stays a plain HF model), and without this each process would
        step them with its own shard's gradient and they would drift apart. Runs once per
        optimizer step, after the last micro-batch's backward and before clipping, so the
        clipping norm and the update are the same on every process.
        """
        if self.accelerator.num_processes <= 1:
            return
        params = [p for p in self.projectors.parameters() if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.accelerator.num_processes
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _clip_grad_norm(self, model):
        """Clip student and projector gradients together, so max_grad_norm bounds the whole
        update (the Trainer alone would clip only the model's)."""
        projector_params = [p for p in self.projectors.parameters() if p.grad is not None]
        if not projector_params or self.is_deepspeed_enabled or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *projector_params]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    # -- loss -----------------------------------------------------------------------------------
    def _targets(self, inputs: dict) -> dict:
        if self.online_teacher is not None:
            return {**inputs, **self.online_teacher(inputs["input_ids"])}
        if self.teacher_head is not None and "teacher_final_hidden" in inputs:
            weight, bias, transform = self.teacher_head
            return {**inputs, "teacher_head_weight": weight, "teacher_head_bias": bias,
                    "teacher_logit_transform": transform}
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        batch = self._targets(inputs)
        input_ids = batch["input_ids"]                                      # (B, L)
        want_hidden = args.gamma > 0 and bool(self.hidden_pairs)
        out = model(input_ids=input_ids, output_hidden_states=True,
                    logits_to_keep=self._no_logits.to(input_ids.device))
        states = out.hidden_states                                          # n_s + 1 x (B, L, D_s)
        kl_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if want_hidden and self.in_hidden_warmup():
            # the warm-up: hidden alignment alone, no head and no logit terms
            hidden = self._hidden_loss(states, batch, kl_mask)
            if model.training:
                self._add_terms(hidden=hidden)
            return (hidden, out) if return_outputs else hidden
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        t2 = args.kd_temperature ** 2
        logit_loss, ce, kl = fused_logit_loss(
            states[-1], head.weight, next_token_labels(input_ids), kl_mask,
            batch.get("teacher_ids"), batch.get("teacher_logp"), batch.get("teacher_log_tail"),
            args.kd_temperature, args.kl_direction, args.logits_chunk_size,
            ce_weight=args.alpha, kl_weight=args.beta * t2, lm_head_bias=head.bias,
            teacher_exact=_exact_teacher(batch), logit_transform=self.student_logit_transform,
            teacher_logit_transform=batch.get("teacher_logit_transform"))
        if "teacher_kl_offset" in batch and args.beta > 0:
            # a sampled cache: KL against the sample minus a per-position constant is the unbiased
            # KL estimate (0 for a student equal to the teacher); the gradient is unchanged
            offset = masked_mean(batch["teacher_kl_offset"].to(kl.device), kl_mask)
            kl = kl - offset
            logit_loss = logit_loss - args.beta * t2 * offset
        hidden = self._hidden_loss(states, batch, kl_mask) if want_hidden else ce.new_zeros(())
        terms = LossTerms(ce=ce, kl=kl, hidden=hidden)
        # = compound_loss(terms, ...); the logit part arrives pre-weighted with its gradient
        loss = logit_loss + args.gamma * hidden
        if model.training:
            self._add_terms(**{name: getattr(terms, name) for name in self._term_sums})
        return (loss, out) if return_outputs else loss

    def in_hidden_warmup(self) -> bool:
        """True while the optimizer step being taken is one of the first ``hidden_warmup_steps``."""
        return self.state.global_step < self.args.hidden_warmup_steps

    def _hidden_loss(self, states, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the aligned pairs of the hidden-state loss, student states through the
        projectors against the teacher's cached (or online) states."""
        flat_mask = mask.reshape(-1)
        per_pair = []
        for i, j in self.hidden_pairs.items():
            s = self.projectors(i, states[i])                               # (B, L, D_t)
            t = batch[hidden_field(j)].to(s.device)                         # (B, L, D_t)
            per_pair.append(hidden_state_loss(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]),
                                              flat_mask, self.args.hidden_loss))
        return torch.stack(per_pair).mean()

    def _add_terms(self, **terms: torch.Tensor) -> None:
        """Add a training micro-batch's loss terms to the sums the next log averages; a term
        that was not computed (CE and KL during the hidden warm-up) is left out of its mean."""
        for name, value in terms.items():
            self._term_sums[name] += float(value.detach())
            self._term_counts[name] += 1

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            names = list(self._term_sums)
            sums = [self._term_sums[n] for n in names]
            counts = [float(self._term_counts[n]) for n in names]
            if self.accelerator.num_processes > 1:
                # "loss" is already the mean over processes (the Trainer gathers it); the terms
                # must be too. Every process logs the same steps, so this collective matches.
                t = torch.tensor([*sums, *counts], dtype=torch.float64, device=self.args.device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
                sums, counts = t[:len(names)].tolist(), t[len(names):].tolist()
            for name, total, count in zip(names, sums, counts):
                if count:
                    logs[f"loss_{name}"] = float(f"{total / count:.7g}")  # small KLs keep digits
            self._term_sums = dict.fromkeys(names, 0.0)
            self._term_counts = dict.fromkeys(names, 0)
        super().log(logs, start_time)

    # -- projectors travel with every save and resume -----------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # the Trainer calls _save on every process; one writes
            save_projectors(self.projectors, output_dir or self.args.output_dir)
            if self.run_record is not None:  # which cache (fingerprint) this state was trained on
                write_run_record(output_dir or self.args.output_dir, self.run_record)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = load_projectors(resume_from_checkpoint, map_location=self.args.device)
        self.projectors.load_state_dict(saved.state_dict())
