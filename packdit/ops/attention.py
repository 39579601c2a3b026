"""``varlen_attention``: attention inside the samples of a packed batch, with factorized spacetime modes
and fused 3-D RoPE, in Triton.

Math (per query head h, kv head ``h // (Hq/Hk)``; ``q (Nq, Hq, D)``, ``k, v (Nk, Hk, D)``)::

    out[i] = sum_{j in keys(i)} softmax_j(scale * <R_i q_i, R_j k_j>) v_j      lse[h, i] = ln sum_j exp(...)

with ``R`` the optional 3-D rotary embedding of each token's ``(t, h, w)`` (identity without rope)
and ``keys(i)`` the tokens of i's sample (``mode="full"``), of i's frame (``"spatial"``) or at i's
spatial position in every frame of its sample (``"temporal"``).

Pipeline, one layout at a time:

1. ``packdit::attention_schedule`` turns ``cu_seqlens`` (+ ``grid`` for the factorized modes) into a
   segment table, query/key tile tables (longest segment first, so the long videos start in the first
   wave and the short images fill the tail) and the tile sizes. It copies the layout to the host once,
   which is also where the value checks (monotone, ``cu_seqlens[-1] == N``, ``max_seqlen`` large enough,
   no dropped tokens for the factorized modes) happen. In eager mode the result is cached on
   :class:`~packdit.layout.PackedSeqs` (``seqs.cached``), so a model pays it once per batch, not per
   layer. Under ``torch.compile`` the op is opaque to the tracer (its outputs have data-dependent
   sizes, unbacked SymInts) and AOTAutograd's CSE merges the identical calls of all layers into one
   per compiled step. Eager calls with plain ``cu_seqlens`` (no ``seqs``) rebuild it every call: with
   one small device->host copy (and the value checks) by default, or, inside ``packdit.checks(False)``,
   from device ops only (no sync, no value checks; tile sizes from the ``max_seqlen`` bucket and tile
   tables padded to the upper bound ``ceil(N / BLOCK) + B``, whose surplus programs exit at once).
2. ``packdit::varlen_attention_fwd`` runs the forward kernel, grid ``(query tiles, Hq, parts)``.
3. ``packdit::varlen_attention_bwd``: delta kernel, then the dK/dV kernel, grid ``(key tiles, Hk, parts)``,
   and dQ either by fp32 atomics inside it (default, fastest) or by a separate dQ kernel, grid
   ``(query tiles, Hq, parts)``, when ``packdit.use_deterministic(True)`` or
   ``torch.use_deterministic_algorithms(True)`` is on (two runs give bitwise equal gradients). ``parts``
   is 1 unless a tile's rows would take more shared memory than fits (wide heads, see _FWD_TILE_BYTES and
   _BWD_TILE_BYTES).

Query tile size (BLOCK_M) per layout: the largest of 128/64/32/16 whose padded rows
``sum_s ceil(L_s / BLOCK_M) * BLOCK_M`` exceed the useful rows ``sum_s L_s`` by at most 1/8. A 144p
16:9 image is 9 x 16 = 144 tokens: 128-row tiles give 2 tiles = 256 rows (44% of them padding),
32-row tiles 160 rows (10%). A batch of such images runs at BLOCK_M = 16/32, while a mix that also
holds 480p (30 x 53 = 1,590 tokens) and 720p (45 x 80 = 3,600) images pads under 8% at 128 and keeps
128, as does a video (17 x 1,590 tokens: 0.4%). Larger tiles read each K/V block once per more query
rows (K/V traffic halves per doubling of BLOCK_M), smaller ones waste fewer padded rows; the 1/8
threshold is a starting heuristic, to be tuned with the GPU benchmark. The key tile of dK/dV
(BLOCK_KT) follows the same rule over the key lengths. The inner key block (BLOCK_N, warps, stages)
is autotuned on a GPU, keyed on head dim, BLOCK_M and the max-length bucket; the interpreter runs one
fixed configuration. Mode "temporal" makes segments of T <= ~33 rows (one per spatial position): they
run at BLOCK_M = 16 with one program per (position, head), correct but far below MMA efficiency --
packing several positions per program is the next step for that mode.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from packdit._validate import checks_enabled, validate_offsets
from packdit.determinism import deterministic_enabled
from packdit.layout import PackedSeqs
from packdit.rope import RoPE3D

__all__ = ["varlen_attention", "RoPE3D", "MODES"]

MODES = ("full", "spatial", "temporal")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_TILE_SIZES = (128, 64, 32, 16)
_MAX_PADDING = 1 / 8
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2_E = 1.4426950408889634
# fp32 inputs multiply in full fp32: tf32 (10-bit mantissa) errors are ~1e3x fp32 torch's, far outside the
# 2x rule; fp16/bf16 dots ignore the setting.
_DOT_PRECISION = "ieee"


# ---------------------------------------------------------------------------------------------- schedule
def _tile_size(lengths: np.ndarray) -> int:
    """Largest tile in _TILE_SIZES whose padded rows exceed the useful rows by at most _MAX_PADDING."""
    useful = int(lengths.sum())
    for size in _TILE_SIZES:
        padded = int((-(-lengths // size) * size).sum())
        if padded <= useful * (1 + _MAX_PADDING):
            return size
    return _TILE_SIZES[-1]


def _tiles(lengths: np.ndarray, active: np.ndarray, size: int) -> np.ndarray:
    """``(n, 2)`` int32 (segment, first row) of the ``active`` segments, longest first."""
    order = np.argsort(-lengths, kind="stable")
    order = order[active[order]]
    counts = -(-lengths[order] // size)
    seg = np.repeat(order, counts)
    first = (np.arange(seg.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)) * size
    return np.stack([seg, first], 1).astype(np.int32).reshape(-1, 2)


def _segments(cu_q: np.ndarray, cu_k: np.ndarray, grids: Optional[np.ndarray], mode: str) -> np.ndarray:
    """``(S, 5)`` int64 segment table: q_start, k_start, q_len, k_len, row_stride."""
    if mode == "full":
        lq, lk = np.diff(cu_q), np.diff(cu_k)
        return np.stack([cu_q[:-1], cu_k[:-1], lq, lk, np.ones_like(lq)], 1)
    frames, hw = grids[:, 0], grids[:, 1] * grids[:, 2]
    bad = np.nonzero(np.diff(cu_q) != frames * hw)[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"seqs: mode={mode!r} needs every token of a sample's grid; sample {b} has "
                         f"{int(cu_q[b + 1] - cu_q[b])} tokens for grid {grids[b].tolist()} (tokens were dropped)")
    if mode == "spatial":      # one segment per frame: HW contiguous rows
        sample = np.repeat(np.arange(len(frames)), frames)
        index = np.arange(sample.shape[0]) - np.repeat(np.cumsum(frames) - frames, frames)
        start, length, stride = cu_q[:-1][sample] + index * hw[sample], hw[sample], np.ones_like(sample)
    else:                      # one segment per spatial position: T rows, H*W apart
        sample = np.repeat(np.arange(len(frames)), hw)
        index = np.arange(sample.shape[0]) - np.repeat(np.cumsum(hw) - hw, hw)
        start, length, stride = cu_q[:-1][sample] + index, frames[sample], hw[sample]
    return np.stack([start, start, length, length, stride], 1).reshape(-1, 5)


@torch.library.custom_op("packdit::attention_schedule", mutates_args=())
def attention_schedule(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, grid: Optional[Tensor], num_q: int, num_k: int,
    max_seqlen_q: int, max_seqlen_k: int, mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(segments (S, 5) int32, q_tiles (Tq, 2) int32, k_tiles (Tk, 2) int32`` on the device, and
    ``params (5,)`` int64 on the CPU: ``BLOCK_M, BLOCK_KT``, max query and key segment lengths, and 1 if some
    key rows are in no key tile (keys of an empty query segment: their dK/dV are zero-filled), else 0."""
    cu_q = cu_seqlens_q.cpu().numpy().astype(np.int64)
    cu_k = cu_seqlens_k.cpu().numpy().astype(np.int64)
    validate_offsets(cu_q, num_q, "cu_seqlens_q", max_seqlen_q)
    validate_offsets(cu_k, num_k, "cu_seqlens_k", max_seqlen_k)
    grids = None if grid is None else grid.cpu().numpy().astype(np.int64).reshape(-1, 3)
    seg = _segments(cu_q, cu_k, grids, mode)
    q_len, k_len = seg[:, 2], seg[:, 3]
    block_m = _tile_size(q_len[q_len > 0])
    block_kt = _tile_size(k_len[(k_len > 0) & (q_len > 0)])
    q_tiles = _tiles(q_len, q_len > 0, block_m)
    k_tiles = _tiles(k_len, (k_len > 0) & (q_len > 0), block_kt)
    device = cu_seqlens_q.device
    keys_uncovered = int(k_len[(k_len > 0) & (q_len > 0)].sum()) < num_k
    params = torch.tensor([block_m, block_kt, int(q_len.max(initial=0)), int(k_len.max(initial=0)), keys_uncovered])
    return (torch.from_numpy(seg.astype(np.int32)).to(device), torch.from_numpy(q_tiles).to(device),
            torch.from_numpy(k_tiles).to(device), params)


@attention_schedule.register_fake
def _(cu_seqlens_q, cu_seqlens_k, grid, num_q, num_k, max_seqlen_q, max_seqlen_k, mode):
    ctx = torch.library.get_ctx()
    return (cu_seqlens_q.new_empty((ctx.new_dynamic_size(), 5)), cu_seqlens_q.new_empty((ctx.new_dynamic_size(), 2)),
            cu_seqlens_q.new_empty((ctx.new_dynamic_size(), 2)), torch.empty(5, dtype=torch.int64, device="cpu"))


def _tile_for_longest(max_len: int) -> int:
    """Tile size from the longest segment alone: the largest of 128/64/32/16 that the longest segment fills
    at least 4 times (a 144-token image gets 32, as under the padding rule; 1,024+ tokens get 128)."""
    return next((size for size in _TILE_SIZES if max_len >= 4 * size), _TILE_SIZES[-1])


def _device_tiles(lengths: Tensor, active: Tensor, size: int, num_rows: int) -> Tensor:
    """Tile table built with device ops only, sized by the host bound ``ceil(num_rows / size) + S`` (each
    segment adds at most one partial tile); longest segment first, surplus rows ``(-1, 0)``."""
    num_segments = lengths.shape[0]
    capacity = -(-num_rows // size) + num_segments
    if num_segments == 0 or capacity == 0:
        return lengths.new_zeros((0, 2))
    order = torch.argsort(torch.where(active, lengths, -1), descending=True, stable=True)
    counts = torch.where(active, (lengths + size - 1) // size, 0)[order]
    ends = torch.cumsum(counts, 0)
    tile = torch.arange(capacity, device=lengths.device, dtype=ends.dtype)
    rank = torch.searchsorted(ends, tile, right=True)
    used = rank < num_segments
    rank = rank.clamp(max=num_segments - 1)
    segment = torch.where(used, order[rank], -1)
    first = torch.where(used, (tile - ends[rank] + counts[rank]) * size, 0)
    return torch.stack([segment, first], 1).to(torch.int32)


def _device_schedule(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, num_q: int, num_k: int, max_seqlen_q: int,
                     max_seqlen_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mode "full" schedule of plain ``cu_seqlens`` without a device->host copy (and without value checks):
    what :func:`attention_schedule` returns, with tile sizes from the ``max_seqlen`` bucket, tile tables
    padded to their upper bound, and dK/dV always zero-filled first."""
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    segments = torch.stack([cu_seqlens_q[:-1].long(), cu_seqlens_k[:-1].long(), lq, lk, torch.ones_like(lq)], 1)
    block_m, block_kt = _tile_for_longest(max_seqlen_q), _tile_for_longest(max_seqlen_k)
    q_tiles = _device_tiles(lq, lq > 0, block_m, num_q)
    k_tiles = _device_tiles(lk, (lk > 0) & (lq > 0), block_kt, num_k)
    params = torch.tensor([block_m, block_kt, max_seqlen_q, max_seqlen_k, 1])
    return segments.to(torch.int32), q_tiles, k_tiles, params


# ---------------------------------------------------------------------------------------------- launchers
@functools.cache
def _kernels():
    """The Triton kernels, imported on first launch so that ``import packdit`` does not import Triton."""
    from packdit.ops import _attention_kernels

    return _attention_kernels


def _fwd_configs() -> list:
    """The forward kernel's autotuning configurations (inner key block BLOCK_N, warps, stages)."""
    import triton

    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
            for n, w, s in ((64, 4, 3), (64, 8, 3), (32, 4, 2), (128, 8, 2))]


@functools.cache
def _fwd_kernel():
    """The forward kernel, autotuned on a GPU; the interpreter cannot autotune (no do_bench, no driver),
    so it runs one fixed configuration (_FIXED_FWD)."""
    import triton

    kernel = _kernels().attention_fwd_kernel
    if _INTERPRET:
        return kernel
    return triton.autotune(_fwd_configs(), key=["HEAD_DIM", "BLOCK_M", "max_len_bucket"])(kernel)


_FIXED_FWD = {"BLOCK_N": 32, "num_warps": 4} if _INTERPRET else {}
# The forward program's query rows (rows x BLOCK_D x element size) are capped at 64 KB: an fp32 query tile of
# 128 x 256 (D = 256) leaves no autotuning configuration within an A100's 163 KiB. A schedule tile with more
# rows runs as several programs (grid axis 2); bf16 / fp16 tiles are never split.
_FWD_TILE_BYTES = 64 * 1024
# Backward inner block: the dK/dV program holds two (BLOCK_KT, BLOCK_D) fp32 accumulators (64 KB at
# 128 x 64) in registers, so the query blocks it streams stay at 32 rows; the dQ program likewise streams
# 32-key blocks. 8 warps from BLOCK_D = 128 up keep the accumulators from spilling.
_BWD_INNER = 32
# The dK/dV program keeps its key tile's K and V rows, the dQ program its query tile's Q and dO rows, in
# shared memory next to the pipelined inner blocks. Capping each at 32 KB (rows x BLOCK_D x element size) and
# pipelining wider rows less deep (_bwd_num_stages) keeps both kernels within an A100's 163 KiB per block: the
# dK/dV kernel on a bf16 tile of 128 x 256 (D = 256) needs 296 KB at 3 stages, more than an H100's 227 KiB.
# A schedule tile with more rows runs as several programs (grid axis 2), each taking _bwd_rows of them.
_BWD_TILE_BYTES = 32 * 1024


def _block_d(head_dim: int) -> int:
    """Head-dim columns a kernel tile holds: the next power of two, at least 16 (``tl.dot``'s minimum K)."""
    return max(16, _next_power_of_2(head_dim))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _fwd_rows(block: int, head_dim: int, itemsize: int) -> int:
    """Rows of a ``block``-row schedule tile that one forward program takes (see _FWD_TILE_BYTES)."""
    return min(block, _FWD_TILE_BYTES // (_block_d(head_dim) * itemsize))


def _bwd_rows(block: int, head_dim: int, itemsize: int) -> int:
    """Rows of a ``block``-row schedule tile that one dK/dV or dQ program takes (see _BWD_TILE_BYTES)."""
    return min(block, _BWD_TILE_BYTES // (_block_d(head_dim) * itemsize))


def _bwd_num_warps(head_dim: int) -> int:
    """Warps of the backward dK/dV and dQ kernels on a GPU."""
    return 8 if _block_d(head_dim) >= 128 else 4


def _bwd_num_stages(head_dim: int, itemsize: int) -> int:
    """Pipeline depth of the backward dK/dV and dQ kernels' inner blocks on a GPU: shallower for wider rows."""
    row_bytes = _block_d(head_dim) * itemsize
    return 3 if row_bytes <= 256 else 2 if row_bytes <= 512 else 1


def _bwd_options(head_dim: int, itemsize: int) -> dict:
    return {} if _INTERPRET else {"num_warps": _bwd_num_warps(head_dim),
                                  "num_stages": _bwd_num_stages(head_dim, itemsize)}


def _rope_args(rope: Optional[RoPE3D]) -> dict:
    axes = rope.axes_dims if rope is not None else (0, 0, 0)
    return {"ROPE": rope is not None, "AX_T": axes[0], "AX_H": axes[1], "AX_W": axes[2]}


def _rope_of(rope_theta: float, rope_axes: list[int]) -> Optional[RoPE3D]:
    return RoPE3D(rope_theta, tuple(rope_axes)) if any(rope_axes) else None


def _check_runnable(q: Tensor) -> None:
    if q.device.type == "cpu" and not _INTERPRET:
        raise ValueError("q: the Triton kernels need a CUDA device; on the CPU set TRITON_INTERPRET=1 before "
                         "importing packdit (slow, for tests) or use packdit.reference.varlen_attention")


@torch.library.custom_op("packdit::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, segments: Tensor, q_tiles: Tensor, k_tiles: Tensor, params: Tensor,
    positions: Optional[Tensor], scale: float, rope_theta: float, rope_axes: list[int],
) -> tuple[Tensor, Tensor]:
    """``(out (Nq, Hq, D) q.dtype, lse (Hq, Nq) fp32)``; ``k_tiles`` is carried for the backward."""
    _check_runnable(q)
    num_q, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q.device)
    block_m, _, max_q_len, _, _ = params.tolist()
    if q_tiles.shape[0] == 0:
        lse.fill_(-math.inf)
        return out.zero_(), lse
    rope = _rope_of(rope_theta, rope_axes)
    kernels_args = _rope_args(rope)
    query_rows = _fwd_rows(block_m, head_dim, q.element_size())
    _fwd_kernel()[(q_tiles.shape[0], num_heads, block_m // query_rows)](
        q, k, v, out, lse, positions if positions is not None else segments, segments, q_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * _LOG2_E, math.log2(rope.theta) if rope else 0.0, _next_power_of_2(max_q_len),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=query_rows,
        GROUP=num_heads // k.shape[1], DOT_PRECISION=_DOT_PRECISION, **kernels_args, **_FIXED_FWD,
    )
    return out, lse


@varlen_attention_fwd.register_fake
def _(q, k, v, segments, q_tiles, k_tiles, params, positions, scale, rope_theta, rope_axes):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("packdit::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    segments: Tensor, q_tiles: Tensor, k_tiles: Tensor, params: Tensor, positions: Optional[Tensor],
    scale: float, rope_theta: float, rope_axes: list[int], deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`varlen_attention_fwd` given ``grad_out`` (and ``grad_lse``, may be None)."""
    _check_runnable(q)
    num_q, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    block_m, block_kt, _, _, keys_uncovered = params.tolist()
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    rope = _rope_of(rope_theta, rope_axes)
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), GROUP=num_heads // kv_heads,
                  DOT_PRECISION=_DOT_PRECISION, **_rope_args(rope))
    log2_theta = math.log2(rope.theta) if rope else 0.0
    pos = positions if positions is not None else segments

    delta = torch.empty_like(lse)
    has_grad_lse = grad_lse is not None
    grad_lse = grad_lse.contiguous() if has_grad_lse else lse
    block_rows = 64
    kernels = _kernels()
    kernels.attention_bwd_delta_kernel[(-(-num_q // block_rows), num_heads)](
        out, grad_out, delta, grad_lse, num_q, out.stride(0), out.stride(1), grad_out.stride(0),
        grad_out.stride(1), lse.stride(0), HEAD_DIM=head_dim, BLOCK_D=shared["BLOCK_D"], BLOCK_R=block_rows,
        HAS_GRAD_LSE=has_grad_lse,
    )
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if keys_uncovered:
        dk.zero_()
        dv.zero_()
    atomic_dq = not deterministic
    dq = torch.zeros(q.shape, dtype=torch.float32 if atomic_dq else q.dtype, device=q.device) if atomic_dq \
        else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    common_strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      grad_out.stride(0), grad_out.stride(1))
    options = _bwd_options(head_dim, q.element_size())
    if k_tiles.shape[0]:
        key_rows = _bwd_rows(block_kt, head_dim, q.element_size())
        kernels.attention_bwd_dkdv_kernel[(k_tiles.shape[0], kv_heads, block_kt // key_rows)](
            q, k, v, grad_out, lse, delta, dq, dk, dv, pos, segments, k_tiles, *common_strides,
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            scale, log2_theta, BLOCK_M=_BWD_INNER, BLOCK_N=key_rows, ATOMIC_DQ=atomic_dq, **shared, **options,
        )
    if atomic_dq:
        return dq.to(q.dtype), dk, dv
    if q_tiles.shape[0]:
        query_rows = _bwd_rows(block_m, head_dim, q.element_size())
        kernels.attention_bwd_dq_kernel[(q_tiles.shape[0], num_heads, block_m // query_rows)](
            q, k, v, grad_out, lse, delta, dq, pos, segments, q_tiles, *common_strides,
            dq.stride(0), dq.stride(1), lse.stride(0), scale, log2_theta,
            BLOCK_M=query_rows, BLOCK_N=_BWD_INNER, **shared, **options,
        )
    else:
        dq.zero_()
    return dq, dk, dv


@varlen_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, segments, q_tiles, k_tiles, params, positions, scale, rope_theta,
      rope_axes, deterministic):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, segments, q_tiles, k_tiles, params, positions, scale, rope_theta, rope_axes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segments, q_tiles, k_tiles, params, positions)
    ctx.scale, ctx.rope_theta, ctx.rope_axes = scale, rope_theta, rope_axes


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, segments, q_tiles, k_tiles, params, positions = ctx.saved_tensors
    deterministic = deterministic_enabled()
    dq, dk, dv = varlen_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, segments, q_tiles, k_tiles, params, positions,
        ctx.scale, ctx.rope_theta, ctx.rope_axes, deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, mode, seqs, rope):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a (tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head_dim) dimension must be contiguous, got strides {t.stride()}")
    head_dim = q.shape[-1]
    if head_dim % 8 or not 8 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {head_dim} unsupported; expected a multiple of 8 up to {_MAX_HEAD_DIM}")
    if k.shape[-1] != head_dim or v.shape != k.shape:
        raise ValueError(f"k, v: expected (Nk, Hk, {head_dim}) each, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: query heads {q.shape[1]} are not divisible by key/value heads {k.shape[1]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is None:
            continue
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name}: expected a (B+1,) int32 tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} like q, got {cu.device}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k: self-attention needs as many key as query tokens, got {k.shape[0]} vs {q.shape[0]}")
    else:
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.shape[0] - 1} segments like cu_seqlens_q, "
                             f"got {cu_seqlens_k.shape[0] - 1}")
        if mode != "full":
            raise ValueError(f"mode: {mode!r} is self-attention only; cross-attention (cu_seqlens_k) needs 'full'")
        if rope is not None:
            raise ValueError("rope: applies to self-attention only; got cu_seqlens_k (cross-attention)")
    if (mode != "full" or rope is not None) and seqs is None:
        raise ValueError(f"seqs: mode={mode!r}{' and rope' if rope is not None else ''} need the PackedSeqs "
                         "layout (grid and positions)")
    if seqs is not None:
        if seqs.cu_seqlens.shape != cu_seqlens_q.shape or seqs.positions.shape[0] != q.shape[0]:
            raise ValueError(f"seqs: layout of {len(seqs)} samples / {seqs.positions.shape[0]} tokens does not "
                             f"match cu_seqlens_q ({cu_seqlens_q.shape[0] - 1} samples) and q ({q.shape[0]} tokens)")
        if mode != "full" and seqs.dropped:
            raise ValueError(f"seqs: mode={mode!r} needs a layout without dropped tokens (pack without drop_rate)")
    if rope is not None:
        if not isinstance(rope, RoPE3D):
            raise ValueError(f"rope: expected a packdit.RoPE3D, got {type(rope).__name__}")
        rope.check_head_dim(head_dim)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    *,
    scale: float | None = None,
    mode: str = "full",
    seqs: PackedSeqs | None = None,
    rope: RoPE3D | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention inside each packed segment; ``out (Nq, Hq, D)`` [and ``lse (Hq, Nq)`` fp32, natural log].

    Args:
        q: ``(Nq, Hq, D)``; k, v: ``(Nk, Hk, D)``, ``Hq % Hk == 0``; fp16/bf16/fp32, D a multiple of 8 <= 256,
            last dim contiguous (other strides free: views of a fused qkv projection need no copy).
        cu_seqlens_q: ``(B+1,)`` int32 query offsets; ``max_seqlen_q`` a host int >= the longest segment.
        cu_seqlens_k, max_seqlen_k: key offsets for cross-attention (a different packing of B segments);
            None for self-attention.
        scale: softmax scale, default ``D ** -0.5``.
        mode: "full" (whole sample), "spatial" (own frame), "temporal" (own (h, w) across frames); the
            factorized modes need ``seqs`` without dropped tokens.
        seqs: the query layout; needed for mode != "full" and rope, and lets the schedule be cached.
        rope: :class:`RoPE3D` applied to q and k from ``seqs.positions`` (self-attention only).
        return_lse: also return the log-sum-exp (differentiable).

    Empty segments produce nothing; a query segment with an empty key segment gives zeros and lse = -inf.
    Argument metadata (dtypes, shapes, devices, strides) is checked on every call at no device cost; value
    checks (monotone ``cu_seqlens``, last entry = N, ``max_seqlen`` large enough, no dropped tokens for the
    factorized modes) run where the schedule is built: once per ``seqs`` in eager mode, once per compiled
    step, every call for plain ``cu_seqlens``, never inside ``packdit.checks(False)`` without ``seqs``.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, mode, seqs, rope)
    self_attention = cu_seqlens_k is None
    cu_k = cu_seqlens_q if self_attention else cu_seqlens_k
    max_k = max_seqlen_q if self_attention else (max_seqlen_k if max_seqlen_k is not None else k.shape[0])
    grid = seqs.grid if mode != "full" else None

    def schedule():
        return attention_schedule(cu_seqlens_q, cu_k, grid, q.shape[0], k.shape[0], max_seqlen_q, max_k, mode)

    if torch.compiler.is_compiling():
        segments, q_tiles, k_tiles, params = schedule()
    elif seqs is not None:
        segments, q_tiles, k_tiles, params = seqs.cached(("attention_schedule", mode, cu_seqlens_q, cu_k), schedule)
    elif not checks_enabled():
        segments, q_tiles, k_tiles, params = _device_schedule(cu_seqlens_q, cu_k, q.shape[0], k.shape[0],
                                                              max_seqlen_q, max_k)
    else:
        segments, q_tiles, k_tiles, params = schedule()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = varlen_attention_fwd(
        q, k, v, segments, q_tiles, k_tiles, params, seqs.positions if rope is not None else None, scale,
        rope.theta if rope is not None else 0.0, list(rope.axes_dims) if rope is not None else [0, 0, 0],
    )
    return (out, lse) if return_lse else out
