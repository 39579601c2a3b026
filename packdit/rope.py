"""``RoPE3D``: the description of a 3-D rotary position embedding, a plain value type.

It says how a head of ``head_dim`` dims is rotated by each token's ``(t, h, w)``: ``axes_dims = (dt, dh, dw)``
dims per axis (each even, ``dt + dh + dw <= head_dim``, the rest unrotated) at base ``theta``. The kernels
(:mod:`packdit.ops.attention`) and the oracle (:mod:`packdit.reference.rope`, where the pair convention and
the angles are defined) both read it, so it lives below both.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator

__all__ = ["RoPE3D"]


@dataclasses.dataclass(frozen=True)
class RoPE3D:
    """Rotary embedding over (t, h, w): ``theta`` base, ``axes_dims = (dt, dh, dw)`` head dims per axis."""

    theta: float = 10000.0
    axes_dims: tuple[int, int, int] = (16, 24, 24)

    def __post_init__(self):
        try:
            dims = tuple(operator.index(d) for d in self.axes_dims)
        except TypeError:  # not a sequence, or a float / string size that int() would have truncated
            dims = ()
        if len(dims) != 3 or any(d < 0 or d % 2 for d in dims):
            raise ValueError(f"axes_dims: expected three non-negative even ints (dt, dh, dw), got {self.axes_dims}")
        # the angle of pair i is pos * theta^(-2i/d): a base <= 1 makes the frequencies grow instead of decay,
        # and an infinite one makes the kernel's exp(-log(theta) * 2i/d) NaN at i = 0
        theta = self.theta
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not (math.isfinite(theta) and theta > 1):
            raise ValueError(f"theta: expected a finite base > 1, got {theta!r}")
        object.__setattr__(self, "axes_dims", dims)
        object.__setattr__(self, "theta", float(theta))

    @property
    def rotated_dims(self) -> int:
        return sum(self.axes_dims)

    def check_head_dim(self, head_dim: int) -> None:
        if self.rotated_dims > head_dim:
            raise ValueError(f"rope: axes_dims {self.axes_dims} rotate {self.rotated_dims} dims, more than "
                             f"head_dim {head_dim}")
