"""``gated_residual``: the adaLN-Zero residual update ``out = x + gate[index] * f`` on packed tokens.

Shapes: x, f (N, D); gate (R, D) (row stride free); index (N,) int32, the gate row of each token
(``seqs.segment_ids`` or a per-token ``mod_index``). Backward::

    dx = dout        df = dout * gate[index]        dgate[r] = sum_{i: index[i]=r} dout_i * f_i

The forward is one elementwise pass over (16 tokens x 128 columns) blocks (reads x, f, writes out: 3 N*D
elements; the gate rows stay in L2). The backward cuts the tokens sorted by row into chunks and one-row
tiles (:func:`packdit.ops._triton_utils.segment_tiles`) over a (chunk, 128-column block) grid: each program
loads its tile's gate row once, writes df with the loads of the next steps in flight (software pipeline),
and one dgate partial per tile, reduced in fixed order (bitwise deterministic). ``dx`` is ``dout`` itself,
no copy. The same backward serves the gated-residual epilogue of :func:`packdit.ops.mlp.fused_mlp`.
:func:`gated_residual_traffic` gives the HBM bytes per token against the minimum.

Runs on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``). The oracle is
:func:`packdit.reference.gated_residual_reference`; :func:`packdit.gated_residual` chooses between the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit.ops import _triton_utils as tu

__all__ = ["gated_residual", "gated_residual_backward", "gated_residual_traffic"]

# Column block of the kernels: 128 columns (a divisor of every DiT width: no idle lanes) x 16 rows = 2048
# elements per program step. The backward keeps _STAGES - 1 steps of loads in flight and assumes _CTAS_PER_SM
# programs of 4 warps fit on an SM at once (checked against the compiled kernel's registers and shared memory).
_BLOCK_D = 128
_BLOCK_M = 16
_STAGES = 3
_CTAS_PER_SM = 6


@triton.jit
def _gated_residual_fwd(
    x_ptr, f_ptr, gate_ptr, index_ptr, out_ptr, N, D, R, stride_x, stride_f, stride_gate, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < N
    mask = token_mask[:, None] & (cols < D)[None, :]
    tokens64 = tokens.to(tl.int64)
    row = tl.load(index_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    row_mask = mask & ((row >= 0) & (row < R))[:, None]
    gate = tl.load(gate_ptr + row[:, None] * stride_gate + cols[None, :], mask=row_mask, other=float("nan"))
    x = tl.load(x_ptr + tokens64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    f = tl.load(f_ptr + tokens64[:, None] * stride_f + cols[None, :], mask=mask, other=0.0)
    out = x.to(tl.float32) + gate.to(tl.float32) * f.to(tl.float32)
    tl.store(out_ptr + tokens64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd(
    dout_ptr, f_ptr, gate_ptr, df_ptr, order_ptr, tiles_ptr, chunk_tiles_ptr, partial_ptr,
    D, num_tiles, stride_dout, stride_f, stride_gate, stride_df, stride_partial,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    """Program (c, j) walks the one-row tiles of chunk c on column block j; per tile, BLOCK_M tokens per step
    with STAGES - 1 steps of loads in flight, and one dgate partial at the end. Chunks own only non-empty tiles,
    so gate rows without tokens (possibly NaN rows of absent samples) are never read."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    for tile in range(tl.load(chunk_tiles_ptr + chunk), tl.load(chunk_tiles_ptr + chunk + 1)):
        row = tl.load(tiles_ptr + tile).to(tl.int64)
        start = tl.load(tiles_ptr + num_tiles + tile)
        end = tl.load(tiles_ptr + 2 * num_tiles + tile)
        gate = tl.load(gate_ptr + row * stride_gate + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for pos0 in tl.range(start, end, BLOCK_M, num_stages=STAGES):
            pos = pos0 + tl.arange(0, BLOCK_M)
            pos_mask = pos < end
            tokens = tl.load(order_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
            mask = pos_mask[:, None] & col_mask[None, :]
            dout = tl.load(dout_ptr + tokens[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0)
            f = tl.load(f_ptr + tokens[:, None] * stride_f + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(dout.to(tl.float32) * f.to(tl.float32), axis=0)
            df = dout.to(tl.float32) * gate[None, :]
            tl.store(df_ptr + tokens[:, None] * stride_df + cols[None, :], df.to(df_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + tl.cast(tile, tl.int64) * stride_partial + cols, acc, mask=col_mask)


def _check_inputs(x: Tensor, f: Tensor, gate: Tensor, index: Tensor, values: bool = True) -> None:
    """Shapes, dtypes and devices of a gated residual ``x + gate[index] * f`` (``ValueError`` naming the argument)."""
    tu.check_float("x", x, dims=2, device=x.device)
    tu.check_float("f", f, dims=2, device=x.device)
    if f.shape != x.shape:
        raise ValueError(f"f: expected shape {tuple(x.shape)} like x, got {tuple(f.shape)}")
    tu.check_rows("gate", gate, x.shape[1], x.device)
    tu.check_index("index", index, x.shape[0], gate.shape[0], x.device, values)


@torch.library.custom_op("packdit::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, f: Tensor, gate: Tensor, index: Tensor) -> Tensor:
    _check_inputs(x, f, gate, index)
    tu.require_triton("gated_residual", x)
    num_tokens, width = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(num_tokens, _BLOCK_M), triton.cdiv(width, _BLOCK_D))
    _gated_residual_fwd[grid](
        x, f, gate, index, out, num_tokens, width, gate.shape[0],
        x.stride(0), f.stride(0), gate.stride(0), out.stride(0), BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D,
    )
    return out


@_gated_residual_op.register_fake
def _(x, f, gate, index):
    _check_inputs(x, f, gate, index, values=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("packdit::gated_residual_backward", mutates_args=())
def gated_residual_backward(dout: Tensor, f: Tensor, gate: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(df (N, D) in f's dtype, dgate (R, D) in gate's dtype)`` of ``out = x + gate[index] * f``."""
    num_tokens, width = f.shape
    num_rows = gate.shape[0]
    df = torch.empty_like(f, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_rows == 0 or width == 0:
        return df, torch.zeros_like(gate)
    dout = dout.contiguous()
    col_blocks = triton.cdiv(width, _BLOCK_D)
    tiles = tu.segment_tiles(index, num_rows, triton.cdiv(_CTAS_PER_SM * tu.num_sms(f.device), col_blocks))
    partials = torch.empty(tiles.num_tiles, width, device=f.device, dtype=torch.float32)
    _gated_residual_bwd[(tiles.num_chunks, col_blocks)](
        dout, f, gate, df, tiles.order, tiles.tiles, tiles.chunk_tiles, partials, width, tiles.num_tiles,
        dout.stride(0), f.stride(0), gate.stride(0), df.stride(0), partials.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D, STAGES=_STAGES,
    )
    return df, tu.segment_sum(partials, tiles, num_rows).to(gate.dtype)


@gated_residual_backward.register_fake
def _(dout, f, gate, index):
    return torch.empty_like(f, memory_format=torch.contiguous_format), torch.empty_like(gate)


def _setup_context(ctx, inputs, output):
    _, f, gate, index = inputs
    ctx.save_for_backward(f, gate, index)


def _backward(ctx, dout):
    f, gate, index = ctx.saved_tensors
    df, dgate = gated_residual_backward(dout, f, gate, index)
    return dout, df, dgate, None


_gated_residual_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_traffic(num_tokens: int, width: int, num_rows: int, *, itemsize: int = 2,
                           gate_itemsize: int | None = None, backward: bool = False, num_sms: int = 132) -> dict:
    """HBM bytes per token of the forward (or ``backward``) kernel against the minimum, an estimate for
    benchmarks: ``{"minimum": ..., "moved": ..., "extra": {reason: bytes}}``. The minimum reads x and f (dout
    and f) and writes out (df) once and touches each gate row once (dgate written); the kernels also read the
    index (forward) or build the segment schedule and partial sums (backward). ``dx`` is ``dout``, no copy."""
    gate_bytes = width * (itemsize if gate_itemsize is None else gate_itemsize)
    n = max(num_tokens, 1)
    if not backward:
        minimum = 3 * width * itemsize + num_rows * gate_bytes / n
        extra = {"index": 4.0}
    else:
        minimum = 3 * width * itemsize + 2 * num_rows * gate_bytes / n
        chunks = triton.cdiv(_CTAS_PER_SM * num_sms, triton.cdiv(width, _BLOCK_D))
        reduction = tu.segment_reduction_bytes(num_tokens, num_rows, chunks, width, 1)
        extra = {k: v / n for k, v in reduction.items()}
    return {"minimum": minimum, "moved": minimum + sum(extra.values()), "extra": extra}


def gated_residual(x: Tensor, f: Tensor, gate: Tensor, index: Tensor) -> Tensor:
    """``x + gate[index] * f`` -> (N, D) in x's dtype; x, f (N, D), gate (R, D), index (N,) int32."""
    return _gated_residual_op(x, f, gate, index)
