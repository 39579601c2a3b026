"""3-D rotary position embedding (RoPE) of packed spacetime tokens: the definition the kernels follow.

Head dimension split (``D`` = head_dim, ``dt + dh + dw <= D``, each even)::

    dims [0, dt)            rotated by the frame index t
    dims [dt, dt+dh)        rotated by the row index h
    dims [dt+dh, dt+dh+dw)  rotated by the column index w
    dims [dt+dh+dw, D)      unrotated

Pair convention: interleaved ("complex") pairs. Dims ``(2j, 2j+1)`` form pair j and are rotated as
the complex number ``x[2j] + i x[2j+1]`` times ``exp(i * angle_j)``::

    y[2j]   = x[2j] cos(angle_j) - x[2j+1] sin(angle_j)
    y[2j+1] = x[2j] sin(angle_j) + x[2j+1] cos(angle_j)

Pair j lies in the axis a in (t, h, w) whose dims hold it; with i its index among that axis's
``d_a / 2`` pairs, ``angle_j = pos_a * theta ** (-2 i / d_a)`` (the RoFormer frequencies per axis).
Pairs past ``dt + dh + dw`` have angle 0. Positions are the true ``(t, h, w)`` of each token
(``PackedSeqs.positions``), so dropped tokens do not shift their neighbours' embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from packdit.rope import RoPE3D

__all__ = ["RoPE3D", "rope_angles", "apply_rope_3d"]


def rope_angles(positions: Tensor, rope: RoPE3D, head_dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(N, head_dim/2)`` angles of every pair of every token; ``positions`` is ``(N, 3)`` (t, h, w)."""
    rope.check_head_dim(head_dim)
    pos = positions.to(dtype)
    angles = torch.zeros(positions.shape[0], head_dim // 2, dtype=dtype, device=positions.device)
    first_pair = 0
    for axis, dim in enumerate(rope.axes_dims):
        inv_freq = rope.theta ** (-torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)
        angles[:, first_pair:first_pair + dim // 2] = pos[:, axis, None] * inv_freq
        first_pair += dim // 2
    return angles


def apply_rope_3d(x: Tensor, positions: Tensor, rope: RoPE3D) -> Tensor:
    """Rotate ``x (N, heads, D)`` by its tokens' ``positions (N, 3)``; angles in float64, result in x.dtype."""
    angles = rope_angles(positions, rope, x.shape[-1])[:, None, :]      # (N, 1, D/2)
    cos, sin = angles.cos(), angles.sin()
    pairs = x.double().unflatten(-1, (-1, 2))                           # (N, heads, D/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
