"""``gated_residual``: the adaLN-Zero residual update ``out = x + gate[index] * f`` on packed tokens.

Shapes: x, f (N, D); gate (R, D) (row stride free); index (N,) int32, the gate row of each token
(``seqs.segment_ids`` or a per-token ``mod_index``). Backward::

    dx = dout        df = dout * gate[index]        dgate[r] = sum_{i: index[i]=r} dout_i * f_i

The forward is one elementwise pass (reads x, f, writes out: 3 N*D elements; the gate rows stay in
L2). The backward walks the one-row tiles of :func:`packdit.ops._triton_utils.segment_tiles` over a
(tile, D-block) grid: each program loads its gate row once, writes df and one dgate partial, reduced in
fixed order (bitwise deterministic). ``dx`` is ``dout`` itself, no copy. The same backward serves the
gated-residual epilogue of :func:`packdit.ops.mlp.fused_mlp`.

Runs on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``). The oracle is
:func:`packdit.reference.gated_residual_reference`; :func:`packdit.gated_residual` chooses between the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit.ops import _triton_utils as tu

__all__ = ["gated_residual", "gated_residual_backward"]

# Column block of the elementwise kernels: 128 columns x 16 rows = 2048 elements per program step.
_BLOCK_D = 128
_BLOCK_M = 16


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
    dout_ptr, f_ptr, gate_ptr, df_ptr, order_ptr, tiles_ptr, partial_ptr,
    D, num_tiles, stride_dout, stride_f, stride_gate, stride_df, stride_partial,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    row = tl.load(tiles_ptr + tile).to(tl.int64)
    start = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=col_mask & (start < end), other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for pos0 in range(start, end, BLOCK_M):
        pos = pos0 + tl.arange(0, BLOCK_M)
        pos_mask = pos < end
        tokens = tl.load(order_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
        mask = pos_mask[:, None] & col_mask[None, :]
        dout = tl.load(dout_ptr + tokens[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + tokens[:, None] * stride_f + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dout * f, axis=0)
        df = dout * gate[None, :]
        tl.store(df_ptr + tokens[:, None] * stride_df + cols[None, :], df.to(df_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + tile * stride_partial + cols, acc, mask=col_mask)


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
    tiles = tu.segment_tiles(index, num_rows, tu.tile_tokens_for(num_tokens))
    partials = torch.empty(tiles.num_tiles, width, device=f.device, dtype=torch.float32)
    _gated_residual_bwd[(tiles.num_tiles, triton.cdiv(width, _BLOCK_D))](
        dout, f, gate, df, tiles.order, tiles.tiles, partials, width, tiles.num_tiles,
        dout.stride(0), f.stride(0), gate.stride(0), df.stride(0), partials.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D,
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


def gated_residual(x: Tensor, f: Tensor, gate: Tensor, index: Tensor) -> Tensor:
    """``x + gate[index] * f`` -> (N, D) in x's dtype; x, f (N, D), gate (R, D), index (N,) int32."""
    return _gated_residual_op(x, f, gate, index)
