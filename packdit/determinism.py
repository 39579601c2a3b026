"""Deterministic mode for packdit's backward kernels.

By default backward kernels may reduce with float atomics (faster, run-to-run bitwise differences of
~1 ulp). ``packdit.use_deterministic(True)`` -- or PyTorch's own
``torch.use_deterministic_algorithms(True)``, which packdit respects -- makes every packdit backward use
fixed-order reductions, so two identical runs give bitwise identical gradients.
"""

from __future__ import annotations

import torch

__all__ = ["use_deterministic", "deterministic_enabled"]

_deterministic = False


def use_deterministic(enabled: bool = True) -> None:
    """Make packdit's backward passes bitwise reproducible (``True``) or allow atomics (``False``)."""
    global _deterministic
    _deterministic = bool(enabled)


def deterministic_enabled() -> bool:
    """``use_deterministic(True)`` was called, or ``torch.are_deterministic_algorithms_enabled()``."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()
