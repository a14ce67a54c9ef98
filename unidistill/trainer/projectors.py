"""Linear maps from student hidden states to the teacher's width, for the hidden-state loss.

A narrower student (d_s < d_t) cannot be compared with the teacher's hidden states directly, so
each mapped student layer gets its own ``Linear(d_s, d_t, bias=False)`` that is trained with the
student. When the widths are equal the projection is the identity (no parameters) unless
``force=True`` asks for a learned one anyway.

Layer indices follow :mod:`unidistill.models.layer_map` (Hugging Face ``hidden_states``
indices, student block i -> teacher block j).

Files written by :func:`save_projectors`: ``projectors.safetensors`` (the state dict) and
``projectors.json`` (:meth:`HiddenProjectors.config_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from torch import nn

from unidistill.errors import ConfigError
from unidistill.models.layer_map import _is_int
from unidistill.storage.files import atomic_write_bytes, atomic_write_json

PROJECTOR_INITS = ("xavier", "identity", "orthogonal", "channels")
FORMAT_VERSION = 1
WEIGHTS_FILE = "projectors.safetensors"
CONFIG_FILE = "projectors.json"


def _check_layer_map(layer_map) -> dict[int, int]:
    """A student-sorted copy of an int -> int layer map, or ConfigError."""
    if not isinstance(layer_map, Mapping):
        raise ConfigError(f"layer_map is {layer_map!r}; expected a dict from student block to "
                          f"teacher block, e.g. from unidistill.models.layer_map.parse_layer_map")
    bad = {k: v for k, v in layer_map.items() if not (_is_int(k) and _is_int(v))}
    if bad:
        raise ConfigError(f"layer_map has non-integer entries {bad!r}; student and teacher "
                          f"layers must be ints, e.g. {{1: 3, 2: 6}}")
    return dict(sorted(layer_map.items()))


def _check_width(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} is {value!r}, but it must be a hidden size >= 1; pass the "
                          f"hidden_size of the model config")
    return value


def _check_channels(channels, d_student: int, d_teacher: int) -> list[int] | None:
    """The teacher channel of each student channel, checked; None when not given."""
    if channels is None:
        return None
    channels = list(channels)
    if (len(channels) != d_student or not all(_is_int(c) and 0 <= c < d_teacher for c in channels)
            or len(set(channels)) != len(channels)):
        raise ConfigError(f"channels must list, for each of the student's {d_student} hidden "
                          f"channels, a distinct teacher channel in 0..{d_teacher - 1}; got "
                          f"{len(channels)} entries starting {channels[:8]!r}. Use the "
                          f"hidden_channels a width-pruning step recorded in the student config")
    return channels


def _init_weight(weight: torch.Tensor, init: str, channels: list[int] | None = None) -> None:
    """Initialise a (d_t, d_s) projection weight in place; see HiddenProjectors for the options."""
    with torch.no_grad():
        if init == "channels":
            weight.zero_()
            cols = torch.arange(weight.shape[1], device=weight.device)
            weight[torch.tensor(channels, device=weight.device), cols] = 1.0
        elif init == "xavier":
            nn.init.xavier_uniform_(weight, gain=1.0)
        elif init == "identity":
            weight.zero_()
            n = min(weight.shape)
            weight[:n, :n] = torch.eye(n, dtype=weight.dtype, device=weight.device)
        elif init == "orthogonal":
            nn.init.orthogonal_(weight)
        else:
            raise ConfigError(f"unknown projector init {init!r}; expected one of "
                              f"{', '.join(PROJECTOR_INITS)}")


class HiddenProjectors(nn.Module):
    """One ``Linear(d_student, d_teacher, bias=False)`` per mapped student layer, or identity.

    Projections exist when ``d_student != d_teacher`` or ``force=True``; otherwise the module has
    no parameters and :meth:`forward` returns its input unchanged. They live in
    ``self.proj``, an ``nn.ModuleDict`` keyed by ``str(student_layer)``.

    ``init`` picks how the weights start:

    * ``"xavier"``: ``xavier_uniform_`` with gain 1.0. Its variance keeps the projected norm close
      to the input norm, so an mse loss starts at a sensible scale rather than exploding or
      vanishing with the width ratio.
    * ``"identity"``: ``W[i, i] = 1`` for the first ``min(d_s, d_t)`` channels, zero elsewhere,
      i.e. student channel i is copied to teacher channel i. The right start when the student's
      channels are a subset/prefix of the teacher's (e.g. after width pruning that keeps channel
      order): the loss then starts at what the pruned student actually inherited.
    * ``"orthogonal"``: ``nn.init.orthogonal_``. W has orthonormal columns when d_t >= d_s, so
      every input keeps its norm exactly (never just on average), and orthonormal rows otherwise,
      so no norm grows; the projected channels start decorrelated.
    * ``"channels"``: ``W[channels[c], c] = 1``, i.e. student channel ``c`` is copied to the
      teacher channel it was cut from. ``channels`` is the ``hidden_channels`` list that
      ``unidistill prune`` records for a width-pruned student; with it the hidden loss starts at
      what the student inherited instead of at a random rotation.
    """

    def __init__(self, layer_map: dict[int, int], d_student: int, d_teacher: int, *,
                 force: bool = False, init: str = "xavier",
                 channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if init not in PROJECTOR_INITS:
            raise ConfigError(f"unknown projector init {init!r}; expected one of "
                              f"{', '.join(PROJECTOR_INITS)}")
        self.layer_map = _check_layer_map(layer_map)
        self.d_student = _check_width("d_student", d_student)
        self.d_teacher = _check_width("d_teacher", d_teacher)
        self.force = bool(force)
        self.init = init
        self.channels = _check_channels(channels, self.d_student, self.d_teacher)
        if init == "channels" and self.channels is None:
            raise ConfigError("projector init 'channels' needs the teacher channel of each student "
                              "channel (channels=...); it exists for students made by "
                              "`unidistill prune --hidden-keep`. Use --projector-init xavier "
                              "for other students")
        self.proj = nn.ModuleDict()
        if self.projects:
            for student_layer in self.layer_map:
                linear = nn.Linear(d_student, d_teacher, bias=False)  # weight (d_t, d_s)
                _init_weight(linear.weight, init, self.channels)
                self.proj[str(student_layer)] = linear

    @property
    def projects(self) -> bool:
        """True when there are learned projections, False when forward is the identity."""
        return self.force or self.d_student != self.d_teacher

    def forward(self, student_layer: int, h: torch.Tensor) -> torch.Tensor:
        """Project student hidden states h (B, L, d_s) of ``student_layer`` to (B, L, d_t).

        With projections, ``h`` is cast to the weight dtype first (so bf16 activations meet fp32
        weights); in identity mode ``h`` itself is returned.
        """
        if student_layer not in self.layer_map:
            raise ConfigError(f"student layer {student_layer!r} has no projector; the layer map "
                              f"covers student layers {list(self.layer_map)}")
        if h.shape[-1] != self.d_student:
            raise ConfigError(f"student layer {student_layer} hidden states have shape "
                              f"{tuple(h.shape)}, but the projectors expect last dim "
                              f"d_student={self.d_student}; build them with the student's "
                              f"hidden_size")
        if not self.projects:
            return h                                                     # (B, L, d_s == d_t)
        linear = self.proj[str(student_layer)]
        return linear(h.to(linear.weight.dtype))                         # (B, L, d_t)

    def project_all(self, hidden_by_student_layer: dict[int, torch.Tensor]
                    ) -> dict[int, torch.Tensor]:
        """Apply :meth:`forward` to every (student_layer -> (B, L, d_s)) entry; same keys back."""
        return {layer: self(layer, h) for layer, h in hidden_by_student_layer.items()}

    def config_dict(self) -> dict:
        """JSON-able description from which :func:`load_projectors` rebuilds this module."""
        config = {"layer_map": {str(i): j for i, j in self.layer_map.items()},
                  "d_student": self.d_student, "d_teacher": self.d_teacher,
                  "force": self.force, "init": self.init, "format_version": FORMAT_VERSION}
        if self.channels is not None:
            config["channels"] = self.channels
        return config

    def extra_repr(self) -> str:
        return (f"d_student={self.d_student}, d_teacher={self.d_teacher}, "
                f"projects={self.projects}, init={self.init!r}")


def save_projectors(projectors: HiddenProjectors, directory: str | Path,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``projectors.safetensors`` and ``projectors.json`` into ``directory``, atomically.

    ``state_dict`` (default: the module's own) is for weights gathered elsewhere, e.g. the
    projectors' part of a state dict FSDP assembled from its shards. Each file goes to a
    temporary name in ``directory`` and is renamed over the target, so a reader never sees half
    a file. The weights are written first, the json last.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = projectors.state_dict() if state_dict is None else state_dict
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    atomic_write_bytes(directory / WEIGHTS_FILE,
                       safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, projectors.config_dict())


def _read_config(path: Path) -> dict:
    """Parse and shape-check projectors.json."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the projectors with "
                          f"save_projectors") from exc
    required = ("layer_map", "d_student", "d_teacher", "force", "init", "format_version")
    missing = [key for key in required if not isinstance(config, dict) or key not in config]
    if missing:
        raise ConfigError(f"{path} lacks {missing}; expected the keys {list(required)} written "
                          f"by save_projectors")
    if config["format_version"] != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {config['format_version']!r}, but this "
                          f"unidistill reads version {FORMAT_VERSION}; re-save the projectors "
                          f"with this version")
    if not isinstance(config["layer_map"], dict):
        raise ConfigError(f"{path} has layer_map {config['layer_map']!r}; expected an object "
                          f'like {{"1": 3}}')
    return config


def _layer_map_from_json(raw: dict, path: Path) -> dict[int, int]:
    """{str(i): j} from the json back to {i: j}."""
    try:
        return {int(key): value for key, value in raw.items()}
    except ValueError as exc:
        raise ConfigError(f"{path} has layer_map keys {list(raw)}, but they must be student "
                          f"block numbers such as \"1\"; re-save the projectors") from exc


def _check_tensors(module: HiddenProjectors, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """ConfigError naming missing/unexpected names and wrong shapes between file and module."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = {name: (found[name], expected[name]) for name in expected
             if name in found and found[name] != expected[name]}
    if missing or unexpected or wrong:
        raise ConfigError(f"{path} does not match its {CONFIG_FILE}: missing tensors {missing}, "
                          f"unexpected tensors {unexpected}, wrong shapes (found, expected) "
                          f"{wrong}; the two files come from different saves, re-save the "
                          f"projectors with save_projectors")


def load_projectors(directory: str | Path, *,
                    map_location: str | torch.device = "cpu") -> HiddenProjectors:
    """Rebuild a :class:`HiddenProjectors` saved by :func:`save_projectors` (strict load).

    Tensors keep the dtype they were saved in and are placed on ``map_location``.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    absent = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if absent:
        raise ConfigError(f"no saved projectors in {str(directory)!r}: {absent} missing; expected "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE} written by save_projectors. Point at "
                          f"the directory the training run saved them to")
    config = _read_config(config_path)
    module = HiddenProjectors(_layer_map_from_json(config["layer_map"], config_path),
                              config["d_student"], config["d_teacher"],
                              force=config["force"], init=config["init"],
                              channels=config.get("channels"))
    try:
        tensors = safetensors.torch.load_file(weights_path, device=str(map_location))
    except safetensors.SafetensorError as exc:
        raise ConfigError(f"{weights_path} is not a readable safetensors file ({exc}); "
                          f"re-save the projectors with save_projectors") from exc
    _check_tensors(module, tensors, weights_path)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.to(map_location)
