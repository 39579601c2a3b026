"""Shared pieces of the Triton ops: where kernels run, input checks, GELU-tanh, row blocking, and the
deterministic segmented reduction used by every backward that reduces over the tokens of a segment.

Segmented reduction (dshift, dscale, dgate): token i contributes a D-vector to row ``index[i]`` of a
``(R, D)`` modulation table. Float atomics would make the sum order (and the bits) depend on scheduling,
so the reduction is two-pass and fixed-order:

1. :func:`segment_tiles` sorts the tokens by row (stable, so segment tokens stay in raster order; for
   ``segment_ids`` the sort is the identity) and cuts each row's tokens into tiles of at most
   ``tile_tokens`` tokens. A tile belongs to exactly one row, so a kernel program that owns a tile
   loads that row's modulation vector once and writes one partial sum ``partials[tile]`` (no atomics).
   The number of tiles is bounded on the host by ``ceil(N / tile_tokens) + R`` (every row adds at most
   one partly filled tile), so the schedule is built with device ops only, no device->host sync; the
   surplus programs get empty tiles.
2. :func:`segment_sum` adds each row's consecutive partials in tile order.

:func:`tile_tokens_for` picks 128 tokens per tile at N = 64k: <= 512 + R partial rows, a 6 MB fp32
buffer per reduced gradient at D = 3072 (vs 800 MB for per-token contributions).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit._validate import checks_enabled

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device (CUDA, or any device under the interpreter)."""
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def tma_capable(device: torch.device) -> bool:
    """Whether kernels may use TMA tensor descriptors on ``device``: sm_90+ CUDA devices, and the CPU under the
    interpreter (which emulates them). Tools that compile launches ahead of time for a target replace this."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu" and interpreting()


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs on a GPU; only the first under the interpreter, where benchmarking cannot run."""
    return configs[:1] if interpreting() else configs


# ---------------------------------------------------------------------- input checks
def check_float(name: str, t: Tensor, *, dims: int, device: torch.device) -> None:
    """``ValueError`` naming ``name`` unless ``t`` is a ``dims``-D fp16/bf16/fp32 tensor on ``device``
    whose last dimension is contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension, got strides {tuple(t.stride())}")


def check_rows(name: str, table: Tensor, width: int, device: torch.device) -> None:
    """A ``(R, width)`` modulation table (rows may be strided, e.g. a chunk of the adaLN output)."""
    check_float(name, table, dims=2, device=device)
    if table.shape[1] != width:
        raise ValueError(f"{name}: expected shape (R, {width}), got {tuple(table.shape)}")


def check_index(name: str, index: Tensor, num_tokens: int, num_rows: int, device: torch.device,
                values: bool = True) -> None:
    """``index`` (N,) int32: the modulation row of each token, in ``[0, num_rows)``.

    With ``values`` (False in fake implementations), the value range is checked on CPU tensors while :func:`packdit.checks` is on; it is not checked on
    a GPU (a device->host sync per layer is too costly): there the kernels read nothing outside the
    table and give NaN outputs for tokens whose row is out of range.
    """
    if not isinstance(index, Tensor) or index.dtype != torch.int32:
        raise ValueError(f"{name}: expected an int32 tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if index.dim() != 1 or index.shape[0] != num_tokens:
        raise ValueError(f"{name}: expected shape ({num_tokens},) (one row per token), got {tuple(index.shape)}")
    if index.device != device or not index.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor on {device}, got {index.device} with strides "
                         f"{tuple(index.stride())}")
    if values and index.device.type == "cpu" and num_tokens and checks_enabled():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"{name}: values must be in [0, {num_rows}) (rows of the modulation table), "
                             f"got range [{lo}, {hi}]")


# ---------------------------------------------------------------------- GELU (tanh approximation)
@triton.jit
def _sigmoid_pair(v):
    """``(sigmoid(v), sigmoid(-v)) = (1 / (1 + e), e / (1 + e))`` with e = exp(-|v|) in (0, 1], swapped for
    v < 0: both to full relative precision (no ``1 - sigmoid`` cancellation, no overflow)."""
    e = tl.exp(-tl.abs(v))
    big = 1.0 / (1.0 + e)
    small = e * big
    positive = v >= 0
    return tl.where(positive, big, small), tl.where(positive, small, big)


@triton.jit
def gelu_tanh(u):
    """``0.5 u (1 + tanh(a))``, a = sqrt(2/pi) (u + 0.044715 u^3), on fp32 u, without libdevice: with
    ``tanh(a) = 2 sigmoid(2a) - 1`` it is ``u * sigmoid(2a)``, which keeps full relative precision for
    negative u (where ``1 + tanh(a)`` would cancel)."""
    inner = 0.7978845608028654 * (u + 0.044715 * u * u * u)
    return u * tl.sigmoid(2.0 * inner)


@triton.jit
def gelu_tanh_and_grad(u):
    """``(gelu_tanh(u), d gelu_tanh / du)`` with s = sigmoid(2a), s' = sigmoid(-2a) = 1 - s:
    ``d/du = s + 2 u s s' da/du`` (``1 - tanh^2 = 4 s s'``; s' computed directly, not as 1 - s, which
    would lose ~5 bits of the gradient at u = 5)."""
    inner = 0.7978845608028654 * (u + 0.044715 * u * u * u)
    d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * u * u)
    s, s_neg = _sigmoid_pair(2.0 * inner)
    return u * s, s + 2.0 * u * s * s_neg * d_inner


# ---------------------------------------------------------------------- row blocking
@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """Launch shape for kernels that hold whole D-rows: ``BLOCK_D = next_pow2(D)`` columns and
    ``BLOCK_M`` rows per step, at most 8192 elements (32 KB of fp32 registers per step)."""

    block_d: int
    block_m: int
    num_warps: int


def row_blocks(width: int, max_rows: int = 16) -> RowBlocks:
    block_d = triton.next_power_of_2(max(width, 1))
    block_m = max(1, min(max_rows, 8192 // block_d))
    num_warps = 4 if block_d <= 1024 else 8
    return RowBlocks(block_d, block_m, num_warps)


# ---------------------------------------------------------------------- deterministic segmented reduction
@dataclasses.dataclass(frozen=True)
class SegmentTiles:
    """Tokens sorted by modulation row and cut into one-row tiles (see the module docstring).

    Attributes:
        order: ``(N,)`` int32, token ids sorted by row (stable).
        tiles: ``(3, num_tiles)`` int32: row, first and one-past-last position in ``order`` of each tile;
            surplus tiles are empty (first == last == 0).
        tile_offsets: ``(R+1,)`` int64, row r owns tiles ``tile_offsets[r] : tile_offsets[r+1]``.
        num_tiles: host int, ``ceil(N / tile_tokens) + R``.
    """

    order: Tensor
    tiles: Tensor
    tile_offsets: Tensor
    num_tiles: int


def tile_tokens_for(num_tokens: int) -> int:
    """Tokens per reduction tile: enough tiles (~512) to fill a GPU, at most 256 tokens each."""
    return max(16, min(256, triton.next_power_of_2(triton.cdiv(max(num_tokens, 1), 512))))


def segment_tiles(index: Tensor, num_rows: int, tile_tokens: int) -> SegmentTiles:
    """Build the one-row tile schedule of ``index`` (N,) int32 over ``num_rows`` rows, on index's device."""
    device = index.device
    num_tokens = index.shape[0]
    sorted_rows, order = torch.sort(index, stable=True)
    row_offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=device, dtype=torch.int32))
    tiles_per_row = (row_offsets[1:] - row_offsets[:-1] + tile_tokens - 1) // tile_tokens
    tile_offsets = torch.cat([tiles_per_row.new_zeros(1), torch.cumsum(tiles_per_row, 0)])
    num_tiles = triton.cdiv(num_tokens, tile_tokens) + num_rows
    tile_ids = torch.arange(num_tiles, device=device, dtype=torch.int64)
    tile_row = (torch.searchsorted(tile_offsets, tile_ids, right=True) - 1).clamp_(0, max(num_rows - 1, 0))
    start = row_offsets[tile_row] + (tile_ids - tile_offsets[tile_row]) * tile_tokens
    end = torch.minimum(start + tile_tokens, row_offsets[tile_row + 1])
    live = tile_ids < tile_offsets[-1]
    start, end = torch.where(live, start, 0), torch.where(live, end, 0)
    tiles = torch.stack([tile_row, start, end]).to(torch.int32)
    return SegmentTiles(order.to(torch.int32), tiles, tile_offsets, num_tiles)


@triton.jit
def _segment_sum_kernel(partials_ptr, tile_offsets_ptr, out_ptr, D, stride_partials, stride_out,
                        BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    first = tl.load(tile_offsets_ptr + row)
    last = tl.load(tile_offsets_ptr + row + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(first, last):
        acc += tl.load(partials_ptr + tile * stride_partials + cols, mask=col_mask, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, acc, mask=col_mask)


def segment_sum(partials: Tensor, tiles: SegmentTiles, num_rows: int) -> Tensor:
    """``(num_tiles, D)`` fp32 per-tile partial sums -> ``(R, D)`` fp32 per-row sums, in tile order.
    Rows without tokens get 0."""
    width = partials.shape[1]
    out = torch.empty(num_rows, width, device=partials.device, dtype=torch.float32)
    if num_rows == 0 or width == 0:
        return out
    block_d = min(1024, triton.next_power_of_2(width))
    _segment_sum_kernel[(num_rows, triton.cdiv(width, block_d))](
        partials, tiles.tile_offsets, out, width, partials.stride(0), out.stride(0), BLOCK_D=block_d
    )
    return out
