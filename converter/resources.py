"""Peak memory and package versions for the receipt."""

from __future__ import annotations

import platform
import resource
from importlib import metadata


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark for this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("converter", "torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
