"""What a job runs on: its torch device, and the peak memory and package versions its receipt records."""

from __future__ import annotations

import platform
import resource
from importlib import metadata

import torch

from converter.errors import BadInputError


def resolve_device(device: str) -> torch.device:
    """The torch device a job's ``device`` option names (auto: CUDA when torch sees a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda was asked for but torch sees no CUDA device",
                            hint="use --device cpu or auto, or install a CUDA build of torch")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def merge_device(device: str, quantized: bool) -> torch.device:
    """Where a job's merge runs. ``auto``: on the CPU, since reading and writing bound it (on the GPU machine it
    measured no faster), except for a quantized base, whose decoding and re-encoding a GPU does far faster."""
    if device == "auto":
        return resolve_device("auto") if quantized else torch.device("cpu")
    return resolve_device(device)


def forward_device(device: str) -> torch.device:
    """Where full verification's forward passes run (``auto``: the GPU when there is one; they are compute-bound)."""
    return resolve_device(device)


def uses_gpu(device: str, verify: str, quantized: bool, has_gpu: bool) -> bool:
    """Whether a job will use a GPU (a Ray task claims one only then)."""
    if device != "auto":
        return device == "cuda"
    return has_gpu and (verify == "full" or quantized)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark for this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last reset, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide the output."""
    out = {"python": platform.python_version()}
    for pkg in ("converter", "torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
