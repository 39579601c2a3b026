"""Loader for the optional native extension ``packdit._C``.

Ops call :func:`load` and fall back to their PyTorch implementations when it
returns ``None``. Nothing is imported or reported at ``import packdit`` time:
the first call to :func:`load` imports ``packdit._C`` and caches the result.
If the module is missing or was built for a different ``ABI_VERSION`` (stale
build), one ``warnings.warn`` is emitted per process.

``PACKDIT_DISABLE_EXT=1`` makes :func:`load` return ``None`` without warning.
"""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType

__all__ = ["ABI_VERSION", "load", "has_cuda_ext"]

#: Must equal ``packdit._C.ABI_VERSION`` (kAbiVersion in csrc/bindings.cpp).
ABI_VERSION = 2

_UNSET = object()
_module: ModuleType | None | object = _UNSET
_lock = threading.Lock()


def _import() -> ModuleType | None:
    try:
        from packdit import _C
    except ImportError as exc:
        reason = f"import failed: {exc}"
    else:
        found = getattr(_C, "ABI_VERSION", None)
        if found == ABI_VERSION:
            return _C
        reason = f"ABI_VERSION {found} != {ABI_VERSION}, rebuild with `pip install -e .`"
    warnings.warn(
        f"packdit: native extension packdit._C not available ({reason}); "
        "using the PyTorch fallback",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def load() -> ModuleType | None:
    """Return the ``packdit._C`` module, or ``None`` if it cannot be used."""
    global _module
    if os.environ.get("PACKDIT_DISABLE_EXT", "0") not in ("", "0"):
        return None
    if _module is _UNSET:
        with _lock:
            if _module is _UNSET:
                _module = _import()
    return _module  # type: ignore[return-value]


def has_cuda_ext() -> bool:
    """Whether the loaded extension was compiled with CUDA kernels."""
    mod = load()
    return mod is not None and bool(getattr(mod, "WITH_CUDA", False))
