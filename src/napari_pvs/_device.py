"""The one device check of the package, and the CPU thread count of the runtimes."""

from __future__ import annotations

import os

from ._errors import PVSInputError

__all__ = ["num_threads", "pick_device"]


def pick_device(preferred: str | None = None) -> str:
    """``preferred`` if given and available, else CUDA, then Apple MPS, then CPU.

    The one device check of the package: prediction, training and the runners use it.

    Raises
    ------
    PVSInputError
        (a ValueError) naming the device and what to use instead.
    """
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if not preferred or preferred == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    try:
        dev = torch.device(preferred)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise PVSInputError(f"unknown device {preferred!r}; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PVSInputError(f"device {preferred!r} requested but CUDA is not available in this "
                            f"torch build ({torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PVSInputError(f"device {preferred!r} does not exist: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not mps_ok:
        raise PVSInputError(f"device {preferred!r} requested but Apple MPS is not available; "
                            "use --device cpu")
    return str(preferred)


def num_threads() -> int:
    env = os.environ.get("NAPARI_PVS_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"NAPARI_PVS_NUM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    import torch

    return max(1, torch.get_num_threads())


