"""What the benchmark results record about the machine they were measured on."""

from __future__ import annotations

import platform

import torch


def machine(device: str = "auto") -> dict:
    """Platform, Python, torch and CPU threads; the GPU's name unless ``device`` is the CPU."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
