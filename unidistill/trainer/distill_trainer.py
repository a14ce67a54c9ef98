"""``UniversalDistillationTrainer``: a Hugging Face Trainer that distills from a teacher cache.

It only wires the building blocks: targets come from the batch (cache) or from an online
teacher, the loss terms from ``losses``, the hidden-state pairs from the layer map and the
projectors. Its ``model`` is a :class:`~unidistill.trainer.student.StudentWithProjectors`, so the
Trainer's own optimizer, clipping, gradient zeroing, DDP / FSDP and checkpointing cover the
projectors. What stays custom is the projector learning rate (one extra optimizer group) and the
files: the student saved as a plain Hugging Face model with ``projectors.safetensors`` +
``projectors.json`` beside it, in every checkpoint and the final model, and restored on resume.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from unidistill.model_logits import OutputHead
from unidistill.models.batch import TokenFields
from unidistill.models.targets import TeacherTargets
from unidistill.trainer.losses import (
    LossConfig,
    distillation_loss,
    hidden_alignment_loss,
    next_token_labels,
)
from unidistill.trainer.projectors import load_projectors, save_projectors
from unidistill.trainer.run_record import write_run_record
from unidistill.trainer.student import StudentWithProjectors


class UniversalDistillationTrainer(Trainer):
    """Trainer whose loss is alpha*CE + beta*T^2*KL + gamma*hidden against cached targets.

    ``model`` is a :class:`~unidistill.trainer.student.StudentWithProjectors`: the student and
    the projectors that bring its widths to the teacher's. ``hidden_pairs`` maps each aligned
    student block to its teacher layer (hidden_states indices). ``online_teacher``, if given,
    is a callable ``input_ids -> dict of teacher fields`` that replaces the cached targets (the
    baseline with the teacher in memory). ``teacher_head`` = (weight, bias, logit transform) of an
    exact-logits cache (an :class:`~unidistill.model_logits.OutputHead` built from
    ``CacheReader.head``), through which the cached final teacher state gives the
    full-vocabulary logits. The student's logits are its head followed by its own
    :class:`~unidistill.model_logits.LogitTransform` (read from its config).
    """

    def __init__(self, *args, hidden_pairs: dict[int, int], online_teacher=None,
                 teacher_head=None, run_record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_pairs = dict(sorted(hidden_pairs.items()))
        self.online_teacher = online_teacher
        self.teacher_head = teacher_head  # exact-logits caches: an OutputHead on the device
        self.loss_config = LossConfig.from_args(self.args)
        self.run_record = run_record  # unidistill_run.json: copied beside every checkpoint
        # compute_loss returns a per-micro-batch mean, so the Trainer must divide by the
        # gradient-accumulation steps itself.
        self.loss_is_scaled_for_ga = False
        self._term_sums = {"ce": 0.0, "kl": 0.0, "hidden": 0.0}
        self._term_counts = dict.fromkeys(self._term_sums, 0)
        self._no_logits = torch.zeros(0, dtype=torch.long)

    def _wrapper(self, model=None) -> StudentWithProjectors:
        """The :class:`StudentWithProjectors` inside ``model`` (default: the Trainer's), unwrapped
        from DDP / FSDP / compilation."""
        return self.accelerator.unwrap_model(self.model if model is None else model,
                                             keep_torch_compile=False)

    # -- optimizer: the student's parameter groups as the Trainer makes them, plus the projectors'
    def create_optimizer(self, model=None):
        """The Trainer's optimizer over the student (its decay / no-decay groups), and one more
        group for the projectors with their own ``projector_learning_rate`` and no weight decay;
        the scheduler then drives that group from its own peak."""
        if self.optimizer is not None:
            return self.optimizer
        wrapper = self._wrapper(model)
        optimizer = super().create_optimizer(wrapper.student)
        params = [p for p in wrapper.projectors.parameters() if p.requires_grad]
        if params:
            lr = self.args.projector_learning_rate or self.args.learning_rate
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
        return optimizer

    # -- loss -----------------------------------------------------------------------------------
    def _targets(self, inputs: dict, tokens: TokenFields) -> TeacherTargets:
        """The batch's teacher targets: from the live teacher, or from the cached fields."""
        if self.online_teacher is not None:
            return self.online_teacher(tokens.input_ids, tokens.document_ids)
        return TeacherTargets.from_fields(inputs, head=self.teacher_head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.loss_config
        tokens = TokenFields.from_fields(inputs)
        targets = self._targets(inputs, tokens)
        input_ids = tokens.input_ids                                        # (B, L)
        mask = tokens.loss_mask()  # (B, L) bool for a packed cache; None: every position (stream)
        want_hidden = cfg.gamma > 0 and bool(self.hidden_pairs)
        out = model(input_ids=input_ids, output_hidden_states=True,
                    logits_to_keep=self._no_logits.to(input_ids.device),
                    project_layers=tuple(self.hidden_pairs) if want_hidden else (),
                    **tokens.forward_kwargs(self._wrapper(model).student))
        if want_hidden and self.in_hidden_warmup():
            # the warm-up: hidden alignment alone, no head and no logit terms
            loss = hidden_alignment_loss(out.projected, targets, self.hidden_pairs, cfg.hidden_loss,
                                         mask)
            terms = {"hidden": loss}
        else:
            loss, all_terms = distillation_loss(
                out.hidden_states[-1], OutputHead.of(self._wrapper(model).student),
                next_token_labels(input_ids), targets, cfg, projected=out.projected,
                hidden_pairs=self.hidden_pairs, mask=mask)
            terms = {name: getattr(all_terms, name) for name in self._term_sums}
        if model.training:
            self._add_terms(**terms)
        return (loss, out) if return_outputs else loss

    def in_hidden_warmup(self) -> bool:
        """True while the optimizer step being taken is one of the first ``hidden_warmup_steps``."""
        return self.state.global_step < self.args.hidden_warmup_steps

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

    # -- saving: a plain HF student with the projectors' two files beside it -------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        """What ``Trainer._save`` writes for a Hugging Face model (the student through
        ``save_pretrained``, the tokenizer, the training arguments), then ``projectors.safetensors``
        + ``projectors.json`` and the run record. ``state_dict`` (FSDP's gathered full state)
        is the whole wrapper's and is split between the two."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:  # the Trainer calls _save on every process; one writes
            return
        wrapper = self._wrapper()
        student_state, projector_state = wrapper.split_state_dict(state_dict)
        wrapper.student.save_pretrained(output_dir, state_dict=student_state)
        save_projectors(wrapper.projectors, output_dir, projector_state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.run_record is not None:  # which cache (fingerprint) this state was trained on
            write_run_record(output_dir, self.run_record)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume from the layout :meth:`_save` writes: the student from its HF files, the
        projectors from theirs. Under FSDP the Trainer's own FSDP checkpoint files hold the whole
        wrapper, projectors included, and it loads them itself."""
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        wrapper = self._wrapper(model)
        super()._load_from_checkpoint(resume_from_checkpoint, wrapper.student)
        saved = load_projectors(resume_from_checkpoint, map_location=self.args.device)
        wrapper.projectors.load_state_dict(saved.state_dict())
