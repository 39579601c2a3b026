"""Shared pieces of the Triton ops: where kernels run, input checks, GELU-tanh, launch shapes (SM count,
row chunking), and the deterministic segmented reduction used by every backward that reduces over the
tokens of a segment.

Segmented reduction (dshift, dscale, dgate): token i contributes a D-vector to row ``index[i]`` of a
``(R, D)`` modulation table. Float atomics would make the sum order (and the bits) depend on scheduling,
so the reduction is two-pass and fixed-order:

1. :func:`segment_tiles` sorts the tokens by row (stable, so segment tokens stay in raster order; for
   ``segment_ids`` the sort is the identity), cuts the sorted positions into equal chunks, one per kernel
   program (balanced work whatever the segment lengths), and each chunk at row boundaries into one-row
   tiles. A program loads a tile's modulation row once and writes one partial sum ``partials[tile]`` (no
   atomics). The number of tiles is bounded on the host by ``num_chunks + R`` (every row adds at most one
   tile to the chunk cuts), so the schedule is built with device ops only, no device->host sync.
2. :func:`segment_sum` adds each row's consecutive partials in tile order.

With one chunk per resident program (a few hundred on an H100) the partials are a few MB, ~2% of the
backward's token traffic at N = 64k, D = 1152 (:func:`segment_reduction_bytes`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit._backends import triton_interpreting as interpreting
from packdit._backends import triton_unsupported
from packdit._validate import checks_enabled

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Base-2 softmax constants for kernels (exp(x) = exp2(x * LOG2E), ln(x) = log2(x) * LN2).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def require_triton(op: str, t: Tensor) -> None:
    """``ValueError`` naming why unless the Triton kernels can run on ``t``'s device (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``); the dispatcher (:mod:`packdit.nn.functional`) falls back instead."""
    reason = triton_unsupported(t.device)
    if reason:
        raise ValueError(f"packdit.ops: the Triton kernel of {op} is not supported because {reason}; "
                         f"packdit.{op} chooses the PyTorch reference automatically")


def tma_capable(device: torch.device) -> bool:
    """Whether kernels may use TMA tensor descriptors on ``device``: sm_90+ CUDA devices, and the CPU under the
    interpreter (which emulates them). Tools that compile launches ahead of time for a target replace this."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu" and interpreting()


def stride_alignment(itemsize: int, *tensors: Tensor) -> int:
    """Elements per 16 bytes if every stride but the last (unit) one of ``tensors`` is a multiple of it, else
    the largest power of two that divides them all. Kernels take strides divided by it (:func:`unit_strides`)
    and multiply by it as a constexpr, so Triton knows every row starts on a 16-byte boundary and vectorizes:
    a head stride of 72 bf16 elements (144 B) is a multiple of 8 but not of 16, the divisibility Triton
    specialises integer arguments on."""
    align = 16 // itemsize
    while align > 1 and any(s % align for t in tensors for s in t.stride()[:-1]):
        align //= 2
    return align


def unit_strides(align: int, *tensors: Tensor) -> list[int]:
    """Every stride but the last of each of ``tensors``, in units of ``align`` elements."""
    return [s // align for t in tensors for s in t.stride()[:-1]]


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

    With ``values`` (False in fake implementations), the value range is checked on CPU tensors while
    :func:`packdit.checks` is on; it is not checked on a GPU (a device->host sync per layer is too costly):
    there the kernels read nothing outside the table and give NaN outputs for tokens whose row is out of
    range.
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


# ---------------------------------------------------------------------- launch shapes
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 4 elsewhere (the interpreter), so that persistent loops run
    several iterations per program in the tests."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """Launch shape of the kernels that hold whole rows of D columns in registers.

    A row is ``num_chunks`` column chunks of ``chunk_d`` columns (a power of two, as Triton tensor shapes must
    be), each a (block_m, chunk_d) tensor: chunks of one shape share one register layout, so a per-row
    statistic adds the chunks elementwise and reduces once. ``chunk_d`` is the largest power of two dividing D,
    at most 512, so no lane idles at DiT widths (1152 = 9 x 128, 2048 = 4 x 512, 3072 = 6 x 512), where one
    2048-column block for D = 1152 would leave 44% of them idle. Widths with a small power-of-two factor use
    wider chunks and mask the last one.

    ``block_m`` rows per step and ``num_warps`` keep 32-48 elements of a row block per thread in the forward
    (one warp per row up to D = 1536) and 12-18 in the backward, which also holds two (block_m, D) fp32
    accumulators (four with an affine norm); ``ctas_per_sm`` programs per SM fit at once with the registers
    this takes (tests check the compiled kernels against it), and the persistent launches size their grid
    with it.
    """

    chunk_d: int
    num_chunks: int
    block_m: int
    num_warps: int
    ctas_per_sm: int


def row_blocks(width: int, backward: bool = False, affine: bool = False) -> RowBlocks:
    width = max(width, 1)
    # At most 16 chunks (unrolled in the kernels; 4 under the interpreter, whose cost is per operation): beyond
    # that, wider chunks and a masked last one.
    max_chunks = 4 if interpreting() else 16
    chunk_d = min(width & -width, 512)
    if width // chunk_d > max_chunks:
        chunk_d = min(512, triton.next_power_of_2(triton.cdiv(width, max_chunks)))
    num_chunks = triton.cdiv(width, chunk_d)
    if backward:
        block_m = 2 if width <= 1536 else 1
        num_warps = 4 if width <= 2048 else 8
        ctas_per_sm = 3 if num_warps == 4 else 2
    else:
        block_m = min(4, 1 << (max(1, 6144 // width).bit_length() - 1))  # 4 rows at 1152, 2 at 2048-3072
        num_warps = 4
        per_thread = block_m * width // (32 * num_warps)
        ctas_per_sm = 4 if per_thread <= 36 else 3 if per_thread <= 48 else 2
    if affine:  # more registers: the weight/bias gradients' accumulators, the affine loads
        ctas_per_sm = max(1, ctas_per_sm - 1)
    if interpreting():  # fewer, larger steps
        block_m = 16
    return RowBlocks(chunk_d, num_chunks, block_m, num_warps, ctas_per_sm)


# ---------------------------------------------------------------------- deterministic segmented reduction
@dataclasses.dataclass(frozen=True)
class SegmentTiles:
    """Tokens sorted by modulation row, cut into equal chunks (one per program) and one-row tiles (see the
    module docstring).

    Attributes:
        order: ``(N,)`` int32, token ids sorted by row (stable).
        tiles: ``(3, num_tiles)`` int32: row, first and one-past-last position in ``order`` of each tile;
            surplus tiles are empty (first == last == 0) and belong to no chunk.
        chunk_tiles: ``(num_chunks + 1,)`` int32, chunk c owns tiles ``chunk_tiles[c] : chunk_tiles[c+1]``.
        tile_offsets: ``(R+1,)`` int64, row r owns tiles ``tile_offsets[r] : tile_offsets[r+1]``.
        num_tiles: host int, ``num_chunks + R`` (a bound: each row adds at most one tile to the chunks).
        num_chunks: host int, ``ceil(N / chunk_tokens)``.
    """

    order: Tensor
    tiles: Tensor
    chunk_tiles: Tensor
    tile_offsets: Tensor
    num_tiles: int
    num_chunks: int


def segment_tiles(index: Tensor, num_rows: int, num_chunks: int) -> SegmentTiles:
    """The schedule of ``index`` (N,) int32 over ``num_rows`` rows for (at most) ``num_chunks`` programs, built
    on index's device without a device->host sync."""
    device = index.device
    num_tokens = index.shape[0]
    chunk_tokens = triton.cdiv(max(num_tokens, 1), max(num_chunks, 1))
    num_chunks = triton.cdiv(num_tokens, chunk_tokens)
    sorted_rows, order = torch.sort(index, stable=True)
    row_offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=device, dtype=torch.int32))
    row_start, row_end = row_offsets[:-1], row_offsets[1:]
    first_chunk = row_start // chunk_tokens
    # A non-empty row spans chunks first_chunk .. (row_end - 1) // chunk_tokens, one tile in each.
    tiles_per_row = torch.where(row_end > row_start, (row_end - 1) // chunk_tokens - first_chunk + 1, 0)
    tile_offsets = torch.cat([tiles_per_row.new_zeros(1), torch.cumsum(tiles_per_row, 0)])
    num_tiles = num_chunks + num_rows
    tile_ids = torch.arange(num_tiles, device=device, dtype=torch.int64)
    tile_row = (torch.searchsorted(tile_offsets, tile_ids, right=True) - 1).clamp_(0, max(num_rows - 1, 0))
    chunk = first_chunk[tile_row] + tile_ids - tile_offsets[tile_row]
    start = torch.maximum(row_start[tile_row], chunk * chunk_tokens)
    end = torch.minimum(row_end[tile_row], (chunk + 1) * chunk_tokens)
    live = tile_ids < tile_offsets[-1]
    start, end = torch.where(live, start, 0), torch.where(live, end, 0)
    # Live tiles are in position order, so their chunks are non-decreasing; surplus tiles go past the last chunk.
    chunk = torch.where(live, chunk, num_chunks)
    chunk_tiles = torch.searchsorted(chunk, torch.arange(num_chunks + 1, device=device, dtype=torch.int64))
    tiles = torch.stack([tile_row, start, end]).to(torch.int32)
    return SegmentTiles(order.to(torch.int32), tiles, chunk_tiles.to(torch.int32), tile_offsets, num_tiles, num_chunks)


def segment_reduction_bytes(num_tokens: int, num_rows: int, num_chunks: int, width: int, reduced: int) -> dict:
    """HBM bytes (estimate) of :func:`segment_tiles` and :func:`segment_sum` for ``reduced`` gradients of
    ``width`` columns, beyond a kernel's own token traffic: ``schedule`` -- the stable sort of the int32
    index (read, sorted rows and int64 permutation written, permutation narrowed to int32), the kernel's read
    of ``order``; ``partials`` -- each fp32 partial row written by the kernel and read back by the fixed-order
    sum (at most ``num_chunks + num_rows`` tiles)."""
    schedule = num_tokens * (4 + 4 + 8 + 8 + 4 + 4)
    partials = 2 * 4 * reduced * width * min(num_chunks + num_rows, num_tokens + num_rows)
    return {"schedule": schedule, "partials": partials}


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
