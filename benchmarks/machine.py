"""What the benchmark results record about the machine, the run and the model they measured,
and the result tag that keeps CPU and GPU results apart."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GPU_TAG = re.compile(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b")  # "NVIDIA H100 80GB HBM3" -> H100


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "accelerate", "tokenizers", "zarr", "numcodecs", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def commit() -> str | None:
    """``$UNIDISTILL_COMMIT`` when set (a copied tree, whose .git may be stale), else the
    checkout's commit (``git rev-parse``, ``+dirty`` with uncommitted changes)."""
    if os.environ.get("UNIDISTILL_COMMIT"):
        return os.environ["UNIDISTILL_COMMIT"]
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if done.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return done.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine(device: str = "auto") -> dict:
    """Platform, Python, torch and library versions, CPU threads, the commit measured; the GPU's
    name, memory, CUDA and driver unless ``device`` is the CPU."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), **_versions(), "commit": commit()}
    if device != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def short(info: dict) -> str:
    """One line of :func:`machine` for the markdown."""
    keys = ("gpu", "driver", "cuda", "torch", "transformers", "python", "cpu_threads", "commit")
    return ", ".join(f"{k} {info[k]}" for k in keys if info.get(k) is not None)


def gpu_tag() -> str:
    """``h100``, ``h200``, ``a100``...: the result tag of the GPU this process sees."""
    name = torch.cuda.get_device_name(0)
    found = GPU_TAG.search(name)
    return found.group(1).lower() if found else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def resolve_tag(tag: str | None, device_type: str) -> str:
    """The result tag: ``cpu`` on the CPU and the GPU's short name on CUDA when none is given.

    Refused: a ``cpu*`` tag for a CUDA run and a GPU's tag (``h100``...) for a CPU run, so GPU
    figures never overwrite the committed CPU ones (``make bench``) and the other way round.
    """
    if tag is None:
        return "cpu" if device_type == "cpu" else gpu_tag()
    base = tag.split("-")[0].lower()
    if device_type == "cuda" and base.startswith("cpu"):
        raise SystemExit(f"--tag {tag!r} names CPU results, but this run is on CUDA; use the GPU's "
                         "name (h100, h200...) or leave --tag out")
    if device_type == "cpu" and GPU_TAG.fullmatch(base.upper()):
        raise SystemExit(f"--tag {tag!r} names GPU results, but this run is on the CPU; use --tag cpu")
    return tag


def model_info(path: str, config=None) -> dict:
    """Shape of a model (from ``config``, or its folder's config.json) and, for a folder written
    by benchmarks/random_model.py, that its weights are random."""
    if config is None:
        cfg_file = Path(path) / "config.json"
        config_d = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    else:
        config_d = config.to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    info = {"path": path, **{k: config_d.get(k) for k in keys}}
    random_file = Path(path) / "random_model.json"
    if random_file.is_file():
        r = json.loads(random_file.read_text())
        info.update(random_weights=True, preset=r.get("preset"), parameters=r.get("parameters"))
    return info


def describe_model(info: dict) -> str:
    """One line of :func:`model_info` for the markdown."""
    what = (f"random-weight `{info['preset']}` (benchmarks/random_model.py)" if info.get("random_weights")
            else f"`{info['path']}`")
    shape = (f"{info.get('num_hidden_layers')} blocks, hidden {info.get('hidden_size')}, MLP "
             f"{info.get('intermediate_size')}, {info.get('num_attention_heads')}/"
             f"{info.get('num_key_value_heads')} heads, vocab {info.get('vocab_size')}")
    params = f", {info['parameters'] / 1e6:.1f} M parameters" if info.get("parameters") else ""
    return f"{what}: {shape}{params}"
