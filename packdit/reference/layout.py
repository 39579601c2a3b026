"""Pure-Python oracle of the packed layout's metadata (:mod:`packdit.layout_positions`), and a
:class:`~packdit.PackedSeqs` built from it, so the reference models pack without any native code.

Token i of sample b (tokens ``cu_seqlens[b]:cu_seqlens[b+1]``) has the raster index
``r = token_index[i]`` (dropped layouts) or ``i - cu_seqlens[b]`` in its sample's (T, H, W) grid, and::

    segment_ids[i] = b,    positions[i] = (r // (H*W), (r // W) % H, r % W)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from packdit.layout import PackedSeqs

__all__ = ["layout_positions_reference", "layout_reference"]


def layout_positions_reference(cu_seqlens: Tensor, grid: Tensor, token_index: Tensor | None,
                               num_tokens: int) -> tuple[Tensor, Tensor]:
    """``(segment_ids (N,) int32, positions (N, 3) int32)`` on the CPU, one token at a time."""
    segment_ids, positions = [], []
    cu, grids = cu_seqlens.tolist(), grid.tolist()
    raster = token_index.tolist() if token_index is not None else None
    for b, (_, h, w) in enumerate(grids):
        for i in range(cu[b], cu[b + 1]):
            r = raster[i] if raster is not None else i - cu[b]
            segment_ids.append(b)
            positions.append((r // (h * w), r // w % h, r % w))
    if len(segment_ids) != num_tokens:
        raise ValueError(f"num_tokens: expected {len(segment_ids)} (cu_seqlens[-1]), got {num_tokens}")
    return (torch.tensor(segment_ids, dtype=torch.int32),
            torch.tensor(positions, dtype=torch.int32).reshape(num_tokens, 3))


def layout_reference(grids: Sequence[Sequence[int]], sample_ndims: Sequence[int],
                     device: torch.device | str | None = None) -> PackedSeqs:
    """The layout of whole samples (no dropped tokens) with patch grids ``grids[b] = (T, H, W)``."""
    lengths = [t * h * w for t, h, w in grids]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    grid = torch.tensor([list(g) for g in grids], dtype=torch.int32).reshape(len(grids), 3)
    segment_ids, positions = layout_positions_reference(cu_seqlens, grid, None, cu[-1])
    return PackedSeqs(cu_seqlens=cu_seqlens.to(device), max_seqlen=max(lengths, default=0), grid=grid.to(device),
                      positions=positions.to(device), segment_ids=segment_ids.to(device),
                      sample_ndims=tuple(sample_ndims))
