"""Where each kernel backend can run, from the tensors' device and what is installed.

Every function returns ``None`` when the backend can run on ``device``, else the reason it cannot, as a
phrase that completes "not supported because ..." (the dispatcher and the ops put it in their errors and
warnings). Nothing here imports Triton, and the checks are plain Python that torch.compile traces.

* ``triton``: Triton kernels run on CUDA devices when the ``triton`` package is installed, and on CPU
  tensors in Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before triton is imported;
  slow, for tests).
* ``cuda``: the CUDA kernels of the native extension ``packdit._C`` run on CUDA devices when the extension
  was built with CUDA (:mod:`packdit._ext` loads it and warns once when it is missing).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from packdit import _ext

__all__ = ["triton_installed", "triton_interpreting", "triton_unsupported", "cuda_ext_unsupported", "EXT_MISSING"]

EXT_MISSING = "the native extension packdit._C is not available (missing, stale, or PACKDIT_DISABLE_EXT=1)"
"""The reason :mod:`packdit._ext` reports itself: it warns once when it cannot load the extension (and not at
all when ``PACKDIT_DISABLE_EXT=1`` asked for that)."""


# find_spec locates the package without importing it; a constant, so torch.compile traces the checks below.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported(device: torch.device) -> str | None:
    if not triton_installed():
        return "the triton package is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return ("the tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton kernels run on CUDA "
                "devices, or on the CPU in the interpreter)")
    return f"Triton kernels do not run on {device.type} tensors"


def cuda_ext_unsupported(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the tensors are on {device.type}, and packdit._C's kernels need CUDA tensors"
    if _ext.load() is None:
        return EXT_MISSING
    if not _ext.has_cuda_ext():
        return "packdit._C was built without CUDA kernels"
    return None
