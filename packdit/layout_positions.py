"""``layout_positions``: segment id and (t, h, w) position of every token of a packed batch.

A packed batch concatenates B samples. Sample b has a ``(T, H, W)`` grid of patches (``grid[b]``)
and owns tokens ``cu_seqlens[b] : cu_seqlens[b+1]``. Token i of sample b has a raster index r inside
its sample's full grid: ``r = i - cu_seqlens[b]``, or ``r = token_index[i]`` when tokens were
dropped. The op returns::

    segment_ids[i] = b                                   (N,)   int32
    positions[i]   = (t, h, w),  r = t*H*W + h*W + w     (N, 3) int32

Inputs: ``cu_seqlens`` ``(B+1,)`` int32 with ``cu_seqlens[0] = 0`` and ``cu_seqlens[B] = N``;
``grid`` ``(B, 3)`` int32; ``token_index`` ``(N,)`` int32 or None; ``num_tokens`` = N as a host int
(so the output shape is known without a device->host sync). All tensors contiguous, on one device.
Only cheap metadata checks are made (dtype, shape, device, contiguity; ``ValueError``); the values
are trusted.

Implementations, chosen per call:

* CUDA tensors and ``packdit._C`` built with CUDA: one kernel launch on the current stream
  (binary search of each token's segment in ``cu_seqlens``).
* CPU tensors and ``packdit._C`` available: one C++ pass over the segments.
* Otherwise: :func:`_layout_positions_torch`, vectorized PyTorch with the same results.

:func:`implementation` tells which one runs for a given device.

It is a ``torch.library`` custom op (``torch.ops.packdit.layout_positions``) with a fake
implementation, so it works under ``torch.compile(fullgraph=True)``.

It belongs to the layout, not to :mod:`packdit.ops`: :meth:`packdit.PackedSeqs.from_grids` calls it, and
the layout sits below the kernels and the dispatcher. All three implementations are the same integer
arithmetic and give identical results (no tolerance, no oracle to choose), so there is nothing to dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from packdit import _ext

__all__ = ["layout_positions", "implementation"]


def _check_inputs(cu_seqlens: Tensor, grid: Tensor, token_index: Optional[Tensor], num_tokens: int) -> None:
    named = [("cu_seqlens", cu_seqlens), ("grid", grid)]
    if token_index is not None:
        named.append(("token_index", token_index))
    for name, t in named:
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected an int32 tensor, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")
        if t.device != cu_seqlens.device:
            raise ValueError(f"{name}: expected a tensor on {cu_seqlens.device} like cu_seqlens, got {t.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected shape (B+1,), got {tuple(cu_seqlens.shape)}")
    num_segments = cu_seqlens.shape[0] - 1
    if grid.dim() != 2 or grid.shape[0] != num_segments or grid.shape[1] != 3:
        raise ValueError(f"grid: expected shape ({num_segments}, 3) to match cu_seqlens, got {tuple(grid.shape)}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens: expected a non-negative int, got {num_tokens}")
    if token_index is not None and (token_index.dim() != 1 or token_index.shape[0] != num_tokens):
        raise ValueError(f"token_index: expected shape ({num_tokens},), got {tuple(token_index.shape)}")


def implementation(cu_seqlens: Tensor) -> str:
    """Which implementation :func:`layout_positions` runs for inputs on ``cu_seqlens.device``:
    ``"cuda"`` (CUDA kernel of packdit._C), ``"cpp"`` (C++ of packdit._C) or ``"torch"`` (fallback)."""
    ext = _ext.load()
    if ext is None:
        return "torch"
    if cu_seqlens.device.type == "cuda":
        return "cuda" if _ext.has_cuda_ext() else "torch"
    return "cpp" if cu_seqlens.device.type == "cpu" else "torch"


def _layout_positions_torch(
    cu_seqlens: Tensor, grid: Tensor, token_index: Optional[Tensor], num_tokens: int
) -> tuple[Tensor, Tensor]:
    """Vectorized PyTorch implementation (no loop over segments, no device->host sync)."""
    device = cu_seqlens.device
    num_segments = cu_seqlens.shape[0] - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    segment_ids = torch.repeat_interleave(
        torch.arange(num_segments, device=device, dtype=torch.int32), lengths, output_size=num_tokens
    )
    seg = segment_ids.long()
    if token_index is None:
        r = torch.arange(num_tokens, device=device, dtype=torch.int32) - cu_seqlens[seg]
    else:
        r = token_index
    tok_grid = grid[seg]  # (N, 3)
    w_size = tok_grid[:, 2]
    hw = tok_grid[:, 1] * w_size
    t = torch.div(r, hw, rounding_mode="floor")
    rem = r - t * hw
    h = torch.div(rem, w_size, rounding_mode="floor")
    w = rem - h * w_size
    positions = torch.stack([t, h, w], dim=1).to(torch.int32)
    return segment_ids, positions


@torch.library.custom_op("packdit::layout_positions", mutates_args=())
def layout_positions(
    cu_seqlens: Tensor, grid: Tensor, token_index: Optional[Tensor], num_tokens: int
) -> tuple[Tensor, Tensor]:
    """``(segment_ids (N,) int32, positions (N, 3) int32)`` of a packed batch; see the module docstring."""
    _check_inputs(cu_seqlens, grid, token_index, num_tokens)
    device = cu_seqlens.device
    impl = implementation(cu_seqlens)
    if impl == "torch":
        return _layout_positions_torch(cu_seqlens, grid, token_index, num_tokens)

    ext = _ext.load()
    segment_ids = torch.empty(num_tokens, dtype=torch.int32, device=device)
    positions = torch.empty(num_tokens, 3, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return segment_ids, positions
    args = (
        cu_seqlens.data_ptr(),
        grid.data_ptr(),
        0 if token_index is None else token_index.data_ptr(),
        cu_seqlens.shape[0] - 1,
        num_tokens,
        segment_ids.data_ptr(),
        positions.data_ptr(),
    )
    if impl == "cuda":
        with torch.cuda.device(device):
            ext.layout_positions_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        ext.layout_positions_cpu(*args)
    return segment_ids, positions


@layout_positions.register_fake
def _(cu_seqlens: Tensor, grid: Tensor, token_index: Optional[Tensor], num_tokens: int) -> tuple[Tensor, Tensor]:
    _check_inputs(cu_seqlens, grid, token_index, num_tokens)
    device = cu_seqlens.device
    return (
        torch.empty(num_tokens, dtype=torch.int32, device=device),
        torch.empty(num_tokens, 3, dtype=torch.int32, device=device),
    )
