"""``StudentWithProjectors``: the student and its hidden-state projectors as one ``nn.Module``.

In the style of TRL's value-head wrapper (``AutoModelForCausalLMWithValueHead``: the pretrained
model as a submodule plus extra heads), so that everything the Hugging Face Trainer does to its
``model`` covers the projectors too: its optimizer sees their parameters, DDP averages their
gradients, FSDP shards them, clipping bounds student and projectors together, and the Trainer
zeroes all gradients after each step.

The projections run inside :meth:`StudentWithProjectors.forward` (not in the loss after it), so
the projected states are forward outputs: DDP with ``find_unused_parameters`` then sees the
projector weights as used, and FSDP has them gathered while they are needed.

On disk nothing changes: a run folder or checkpoint holds the student as a plain Hugging Face
model (``save_pretrained``, no projector keys) and the projectors beside it as
``projectors.safetensors`` + ``projectors.json`` (:func:`.projectors.save_projectors`).
:meth:`StudentWithProjectors.split_state_dict` splits a whole-wrapper state dict (what FSDP
gathers for a save) into those two parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from unidistill.trainer.projectors import HiddenProjectors

STUDENT_PREFIX, PROJECTORS_PREFIX = "student.", "projectors."


@dataclass
class StudentOutput(CausalLMOutputWithPast):
    """The student's own output plus ``projected``: student layer -> its hidden states through
    the projectors, (B, L, d_teacher), for the layers the forward call asked for.

    A ``ModelOutput`` (a mapping), so accelerate's mixed-precision wrapper hands back its tensors
    in fp32 exactly as it does the student's own output."""

    projected: dict[int, torch.Tensor] | None = None


class StudentWithProjectors(nn.Module):
    """A causal-LM ``student`` and the ``projectors`` that bring its hidden states to the
    teacher's width, trained, wrapped and checkpointed as one module.

    The attributes the Trainer reads from a Hugging Face model (``config``, ``generation_config``,
    activation checkpointing, the parameter count behind its FLOP estimate, FSDP's
    ``_no_split_modules``) are the student's.
    """

    main_input_name = "input_ids"

    def __init__(self, student: nn.Module, projectors: HiddenProjectors) -> None:
        super().__init__()
        self.student = student
        self.projectors = projectors

    def forward(self, input_ids: torch.Tensor | None = None, project_layers=(), **kwargs
                ) -> StudentOutput:
        """The student on ``input_ids`` (``kwargs`` such as ``output_hidden_states`` and
        ``logits_to_keep`` passed through), and the hidden states of each student layer in
        ``project_layers`` (``hidden_states`` indices) through its projector.

        The projections run with autocast off: the projectors cast their input to their own
        (fp32) dtype, so under bf16 they see the rounded bf16 states but compute in fp32.
        """
        out = self.student(input_ids=input_ids, **kwargs)
        projected = {}
        if project_layers:
            states = out.hidden_states                                   # n_s + 1 x (B, L, D_s)
            with torch.autocast(states[0].device.type, enabled=False):
                projected = {i: self.projectors(i, states[i]) for i in project_layers}
        return StudentOutput(**out, projected=projected)

    # -- what the Trainer reads from a Hugging Face model: the student's ---------------------
    @property
    def config(self):
        return self.student.config

    @property
    def generation_config(self):
        return getattr(self.student, "generation_config", None)

    @property
    def _no_split_modules(self):
        """The blocks FSDP's transformer auto-wrap policy wraps on their own (the student's)."""
        return getattr(self.student, "_no_split_modules", None)

    @property
    def _keys_to_ignore_on_save(self):
        return getattr(self.student, "_keys_to_ignore_on_save", None)

    def tie_weights(self, *args, **kwargs):
        return self.student.tie_weights(*args, **kwargs)

    def num_parameters(self, *args, **kwargs) -> int:
        """The student's count: the Trainer's FLOP estimate (``total_flos``) is the student's."""
        return self.student.num_parameters(*args, **kwargs)

    def activation_checkpointing_enable(self, *args, **kwargs):
        return self.student.activation_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_disable(self):
        return self.student.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.student.is_activation_checkpointing

    # -- one state dict, two files ---------------------------------------------------------
    @staticmethod
    def split_state_dict(state_dict: dict | None) -> tuple[dict | None, dict | None]:
        """(student, projectors) state dicts, unprefixed, from a whole-wrapper state dict;
        (None, None) for None (each part then saves its own module's state)."""
        if state_dict is None:
            return None, None
        parts = ({}, {})
        for name, tensor in state_dict.items():
            for part, prefix in zip(parts, (STUDENT_PREFIX, PROJECTORS_PREFIX)):
                if name.startswith(prefix):
                    part[name[len(prefix):]] = tensor
        return parts
