"""``modulated_norm``: LayerNorm/RMSNorm fused with adaLN modulation on packed tokens.

For tokens x (N, D), modulation tables shift, scale (R, D) and the row of each token
``index`` (N,) int32 (``seqs.segment_ids`` for one row per sample, or a per-token ``mod_index``, e.g.
one row per frame for per-frame timesteps)::

    LayerNorm  xhat = (x - mean) * rstd,   rstd = 1 / sqrt(var + eps)       (biased var over D)
    RMSNorm    xhat = x * rstd,            rstd = 1 / sqrt(mean(x^2) + eps)
    z = xhat * weight + bias               (weight, bias (D,) optional; DiT uses neither)
    y = z * (1 + scale[index]) + shift[index]

Backward, with s = 1 + scale[index] and dz = dy * s::

    dshift[r] = sum_{i: index[i]=r} dy_i        dscale[r] = sum_{i: index[i]=r} dy_i * z_i
    dweight = sum_i dz_i * xhat_i               dbias = sum_i dz_i
    dxhat = dz * weight
    LayerNorm  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    RMSNorm    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))

Kernels: the forward holds BLOCK_M whole rows per step (statistics in fp32) and saves mean and rstd
(8 bytes per token) so the backward does not recompute the reductions. The backward walks the one-row
tiles of :func:`packdit.ops._triton_utils.segment_tiles`: each program loads its row's ``scale`` once,
writes dx for its tokens and one partial sum of dshift/dscale/dweight/dbias; the partials are reduced
in fixed order (bitwise deterministic, no atomics). Rows without tokens get zero gradients and their
values are never read (NaN rows of absent samples do not leak).

Runs the Triton kernels on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``). The oracle is
:func:`packdit.reference.modulated_norm_reference`; :func:`packdit.modulated_norm` chooses between the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit.ops import _triton_utils as tu

__all__ = ["modulated_norm"]


@triton.jit
def _modulated_norm_fwd(
    x_ptr, y_ptr, shift_ptr, scale_ptr, index_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
    N, D, R, stride_x, stride_y, stride_shift, stride_scale, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    token_mask = tokens < N
    col_mask = cols < D
    mask = token_mask[:, None] & col_mask[None, :]
    tokens64 = tokens.to(tl.int64)
    x = tl.load(x_ptr + tokens64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + tokens, mean, mask=token_mask)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(rstd_ptr + tokens, rstd, mask=token_mask)
    z = xc * rstd[:, None]
    if HAS_WEIGHT:
        z = z * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    row = tl.load(index_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    # Out-of-range rows read nothing and give NaN (values are only checked on the host for CPU inputs).
    row_mask = mask & ((row >= 0) & (row < R))[:, None]
    shift = tl.load(shift_ptr + row[:, None] * stride_shift + cols[None, :], mask=row_mask, other=float("nan"))
    scale = tl.load(scale_ptr + row[:, None] * stride_scale + cols[None, :], mask=row_mask, other=float("nan"))
    y = z * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(y_ptr + tokens64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_norm_bwd(
    x_ptr, dy_ptr, dx_ptr, scale_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, order_ptr, tiles_ptr,
    partial_shift_ptr, partial_scale_ptr, partial_weight_ptr, partial_bias_ptr,
    D, num_tiles, stride_x, stride_dy, stride_dx, stride_scale, stride_partial,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    row = tl.load(tiles_ptr + tile).to(tl.int64)
    start = tl.load(tiles_ptr + num_tiles + tile)
    end = tl.load(tiles_ptr + 2 * num_tiles + tile)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    # Empty (surplus) tiles must not read their clamped row: it may be a NaN row of an absent sample.
    s = 1.0 + tl.load(scale_ptr + row * stride_scale + cols, mask=col_mask & (start < end), other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_weight = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for pos0 in range(start, end, BLOCK_M):
        pos = pos0 + tl.arange(0, BLOCK_M)
        pos_mask = pos < end
        tokens = tl.load(order_ptr + pos, mask=pos_mask, other=0).to(tl.int64)
        mask = pos_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + tokens[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tokens, mask=pos_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + tokens, mask=pos_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        z = xhat
        if HAS_WEIGHT:
            z = z * w[None, :]
        if HAS_BIAS:
            z = z + b[None, :]
        acc_shift += tl.sum(dy, axis=0)
        acc_scale += tl.sum(dy * z, axis=0)
        dz = dy * s[None, :]
        dxhat = dz
        if HAS_WEIGHT:
            acc_weight += tl.sum(dz * xhat, axis=0)
            dxhat = dz * w[None, :]
        if HAS_BIAS:
            acc_bias += tl.sum(dz, axis=0)
        proj = tl.sum(dxhat * xhat, axis=1) / D
        if IS_RMS:
            dx = (dxhat - xhat * proj[:, None]) * rstd[:, None]
        else:
            dx = (dxhat - (tl.sum(dxhat, axis=1) / D)[:, None] - xhat * proj[:, None]) * rstd[:, None]
        tl.store(dx_ptr + tokens[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    offset = tile * stride_partial + cols
    tl.store(partial_shift_ptr + offset, acc_shift, mask=col_mask)
    tl.store(partial_scale_ptr + offset, acc_scale, mask=col_mask)
    if HAS_WEIGHT:
        tl.store(partial_weight_ptr + offset, acc_weight, mask=col_mask)
    if HAS_BIAS:
        tl.store(partial_bias_ptr + offset, acc_bias, mask=col_mask)


# ---------------------------------------------------------------------- checks
def _check_inputs(x, shift, scale, index, weight, bias, eps, values: bool = True) -> None:
    tu.check_float("x", x, dims=2, device=x.device)
    width = x.shape[1]
    tu.check_rows("shift", shift, width, x.device)
    tu.check_rows("scale", scale, width, x.device)
    if shift.shape != scale.shape or shift.dtype != scale.dtype:
        raise ValueError(f"shift, scale: expected equal shapes and dtypes, got {tuple(shift.shape)} {shift.dtype} "
                         f"and {tuple(scale.shape)} {scale.dtype}")
    tu.check_index("index", index, x.shape[0], shift.shape[0], x.device, values)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            tu.check_float(name, p, dims=1, device=x.device)
            if p.shape[0] != width:
                raise ValueError(f"{name}: expected shape ({width},), got {tuple(p.shape)}")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps}")


def _param_grad_like(p: Optional[Tensor], x: Tensor) -> Tensor:
    return torch.empty(0, device=x.device, dtype=x.dtype) if p is None else torch.empty_like(p)


# ---------------------------------------------------------------------- custom ops
@torch.library.custom_op("packdit::modulated_norm", mutates_args=())
def _modulated_norm_op(
    x: Tensor, shift: Tensor, scale: Tensor, index: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y (N, D), mean (N,) fp32, rstd (N,) fp32)``; mean is 0 for RMSNorm."""
    _check_inputs(x, shift, scale, index, weight, bias, eps)
    tu.require_triton("modulated_norm", x)
    num_tokens, width = x.shape
    mean = torch.zeros(num_tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty(num_tokens, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return y, mean, rstd
    blocks = tu.row_blocks(width)
    _modulated_norm_fwd[(triton.cdiv(num_tokens, blocks.block_m),)](
        x, y, shift, scale, index, weight, bias, mean, rstd,
        num_tokens, width, shift.shape[0], x.stride(0), y.stride(0), shift.stride(0), scale.stride(0), eps,
        IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=blocks.block_m, BLOCK_D=blocks.block_d, num_warps=blocks.num_warps,
    )
    return y, mean, rstd


@_modulated_norm_op.register_fake
def _(x, shift, scale, index, weight, bias, eps, rms):
    _check_inputs(x, shift, scale, index, weight, bias, eps, values=False)
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("packdit::modulated_norm_backward", mutates_args=())
def _modulated_norm_backward_op(
    dy: Tensor, x: Tensor, scale: Tensor, index: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dshift, dscale, dweight, dbias)``; dshift has scale's shape and dtype (shift and scale are
    checked alike); dweight/dbias are empty when weight/bias are None."""
    num_tokens, width = x.shape
    num_rows = scale.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dweight, dbias = _param_grad_like(weight, x), _param_grad_like(bias, x)
    if num_tokens == 0 or num_rows == 0:
        for g in (dweight, dbias):
            g.zero_()
        return dx, torch.zeros_like(scale), torch.zeros_like(scale), dweight, dbias
    dy = dy.contiguous()
    blocks = tu.row_blocks(width)
    tiles = tu.segment_tiles(index, num_rows, tu.tile_tokens_for(num_tokens))
    # One (num_tiles, D) fp32 partial-sum buffer per reduced gradient: dshift, dscale[, dweight][, dbias].
    partials = torch.empty(2 + (weight is not None) + (bias is not None), tiles.num_tiles, width,
                           device=x.device, dtype=torch.float32).unbind(0)
    partial_weight = partials[2] if weight is not None else None
    partial_bias = partials[-1] if bias is not None else None
    _modulated_norm_bwd[(tiles.num_tiles,)](
        x, dy, dx, scale, weight, bias, mean, rstd, tiles.order, tiles.tiles,
        partials[0], partials[1], partial_weight, partial_bias,
        width, tiles.num_tiles, x.stride(0), dy.stride(0), dx.stride(0), scale.stride(0), partials[0].stride(0),
        IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=blocks.block_m, BLOCK_D=blocks.block_d, num_warps=blocks.num_warps,
    )
    dshift = tu.segment_sum(partials[0], tiles, num_rows).to(scale.dtype)
    dscale = tu.segment_sum(partials[1], tiles, num_rows).to(scale.dtype)
    if weight is not None:
        dweight.copy_(partial_weight.sum(0))
    if bias is not None:
        dbias.copy_(partial_bias.sum(0))
    return dx, dshift, dscale, dweight, dbias


@_modulated_norm_backward_op.register_fake
def _(dy, x, scale, index, weight, bias, mean, rstd, rms):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(scale), _param_grad_like(weight, x), _param_grad_like(bias, x))


def _setup_context(ctx, inputs, output):
    x, shift, scale, index, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, index, weight, bias, mean, rstd)
    ctx.rms = rms
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, index, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight, dbias = _modulated_norm_backward_op(
        dy, x, scale, index, weight, bias, mean, rstd, ctx.rms)
    return (dx, dshift, dscale, None, None if weight is None else dweight, None if bias is None else dbias,
            None, None)


_modulated_norm_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_norm(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    index: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    norm_type: str = "layer",
) -> Tensor:
    """``norm(x) * (1 + scale[index]) + shift[index]`` -> (N, D) in x's dtype; see the module docstring.

    Args:
        x: ``(N, D)`` packed tokens, fp16/bf16/fp32, last dim contiguous.
        shift, scale: ``(R, D)`` modulation rows (same dtype; row stride free, so chunks of the adaLN
            output ``(B, k*D)`` can be passed without a copy).
        index: ``(N,)`` int32 row of each token, ``seqs.segment_ids`` or a per-token ``mod_index``.
        weight, bias: optional ``(D,)`` affine parameters of the norm.
        norm_type: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
    """
    if norm_type not in ("layer", "rms"):
        raise ValueError(f"norm_type: expected 'layer' or 'rms', got {norm_type!r}")
    return _modulated_norm_op(x, shift, scale, index, weight, bias, float(eps), norm_type == "rms")[0]
