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

Kernels. A row is held in registers as equal power-of-two column chunks (``RowBlocks``: 1152 = 9 x 128,
3072 = 6 x 512), so no lane idles at non-power-of-two widths and a row statistic is one reduction of the
chunks' elementwise sum.

* Forward: persistent (``ctas_per_sm`` programs per SM walk the row blocks of BLOCK_M tokens); each program
  loads the next block of x (and its index) into registers before computing the current one, so a block of
  loads is always in flight. Statistics in fp32; mean and rstd are saved (8 bytes per token) so the backward
  does not recompute the reductions.
* Backward: the tokens sorted by row are cut into one equal chunk per program
  (:func:`packdit.ops._triton_utils.segment_tiles`), each chunk into one-row tiles. A program loads its
  tile's ``scale`` row once, prefetches the next step's x and dy, writes dx, and accumulates dshift/dscale
  (/dweight/dbias) elementwise in registers, summing over rows once per tile into a partial row; the
  partials are reduced in fixed order (bitwise deterministic, no atomics). Rows without tokens get zero
  gradients and their values are never read (NaN rows of absent samples do not leak).

:func:`modulated_norm_traffic` gives the HBM bytes per token against the minimum.

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

__all__ = ["modulated_norm", "modulated_norm_traffic"]


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _chunk_mask(token_mask, c: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
    """In-bounds mask of column chunk ``c`` for rows ``token_mask``; the column term folds away unless the last
    chunk runs past D."""
    cols = c * CHUNK + tl.arange(0, CHUNK)
    return token_mask[:, None] & (cols < D)[None, :]


@triton.jit
def _load_chunks(ptr, rows, stride, row_mask, D: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """The NUM_CHUNKS column chunks (rows, CHUNK) of rows ``rows`` (int64) of an (N, D) tensor, in its dtype, as a
    tuple; zeros outside ``row_mask`` and D."""
    base = ptr + rows[:, None] * stride + tl.arange(0, CHUNK)[None, :]
    chunks = ()
    for c in tl.static_range(NUM_CHUNKS):
        chunks = chunks + (tl.load(base + c * CHUNK, mask=_chunk_mask(row_mask, c, D, CHUNK), other=0.0),)
    return chunks


@triton.jit
def _store_chunks(ptr, rows, stride, chunks, row_mask, D: tl.constexpr, CHUNK: tl.constexpr,
                  NUM_CHUNKS: tl.constexpr):
    base = ptr + rows[:, None] * stride + tl.arange(0, CHUNK)[None, :]
    for c in tl.static_range(NUM_CHUNKS):
        tl.store(base + c * CHUNK, chunks[c].to(ptr.dtype.element_ty), mask=_chunk_mask(row_mask, c, D, CHUNK))


@triton.jit
def _load_vector(ptr, c: tl.constexpr, other, D: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk ``c`` (CHUNK,) of the D-vector at ``ptr`` in fp32 (``other`` outside D)."""
    cols = c * CHUNK + tl.arange(0, CHUNK)
    return tl.load(ptr + cols, mask=cols < D, other=other).to(tl.float32)


@triton.jit
def _load_vector_chunks(ptr, D: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """The NUM_CHUNKS (CHUNK,) chunks of the D-vector at ``ptr`` in fp32 (zeros outside D), as a tuple."""
    chunks = ()
    for c in tl.static_range(NUM_CHUNKS):
        chunks = chunks + (_load_vector(ptr, c, 0.0, D, CHUNK),)
    return chunks


@triton.jit
def _modulated_norm_fwd(
    x_ptr, y_ptr, shift_ptr, scale_ptr, index_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
    N, R, stride_x, stride_y, stride_shift, stride_scale, eps,
    D: tl.constexpr, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    """Persistent: program p normalises row blocks p, p + grid, ... of BLOCK_M tokens, and loads block b + grid
    into registers before it computes block b, so one block of x per program is always in flight. A row is
    NUM_CHUNKS column chunks of CHUNK columns (see ``RowBlocks``)."""
    grid = tl.num_programs(0)
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    next_x = _load_chunks(x_ptr, tokens.to(tl.int64), stride_x, tokens < N, D, CHUNK, NUM_CHUNKS)
    next_row = tl.load(index_ptr + tokens, mask=tokens < N, other=0)
    for block in range(tl.program_id(0), tl.cdiv(N, BLOCK_M), grid):
        x_raw, row = next_x, next_row
        tokens = block * BLOCK_M + tl.arange(0, BLOCK_M)
        token_mask = tokens < N
        tokens64 = tokens.to(tl.int64)
        ahead = tokens + grid * BLOCK_M
        next_x = _load_chunks(x_ptr, ahead.to(tl.int64), stride_x, ahead < N, D, CHUNK, NUM_CHUNKS)
        next_row = tl.load(index_ptr + ahead, mask=ahead < N, other=0)

        # Row statistics: the chunks are added elementwise first, so each statistic is one reduction.
        x = ()
        total = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        for c in tl.static_range(NUM_CHUNKS):
            x = x + (x_raw[c].to(tl.float32),)
            total += x[c]
        if IS_RMS:
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        else:
            mean = tl.sum(total, axis=1) / D
            tl.store(mean_ptr + tokens, mean, mask=token_mask)
        squares = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        for c in tl.static_range(NUM_CHUNKS):
            centred = tl.where(_chunk_mask(token_mask, c, D, CHUNK), x[c] - mean[:, None], 0.0)
            squares += centred * centred
        rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / D + eps)
        tl.store(rstd_ptr + tokens, rstd, mask=token_mask)

        # Out-of-range rows read no modulation row and give NaN (values are only checked on the host for CPU
        # inputs), through the per-row factor.
        row_ok = (row >= 0) & (row < R)
        row = tl.where(row_ok, row, 0).to(tl.int64)
        rstd = tl.where(row_ok, rstd, float("nan"))
        shift = _load_chunks(shift_ptr, row, stride_shift, row_ok, D, CHUNK, NUM_CHUNKS)
        scale = _load_chunks(scale_ptr, row, stride_scale, row_ok, D, CHUNK, NUM_CHUNKS)
        y = ()
        for c in tl.static_range(NUM_CHUNKS):
            z = x[c] * rstd[:, None] - (mean * rstd)[:, None]
            # weight and bias are re-read per block (L1 hits) rather than held: 2 D / 64 registers per thread.
            if HAS_WEIGHT:
                z = z * _load_vector(weight_ptr, c, 1.0, D, CHUNK)[None, :]
            if HAS_BIAS:
                z = z + _load_vector(bias_ptr, c, 0.0, D, CHUNK)[None, :]
            y = y + (z * (1.0 + scale[c].to(tl.float32)) + shift[c].to(tl.float32),)
        _store_chunks(y_ptr, tokens64, stride_y, y, token_mask, D, CHUNK, NUM_CHUNKS)


@triton.jit
def _modulated_norm_bwd(
    x_ptr, dy_ptr, dx_ptr, scale_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, order_ptr, tiles_ptr,
    chunk_tiles_ptr, partial_shift_ptr, partial_scale_ptr, partial_weight_ptr, partial_bias_ptr,
    num_tiles, stride_x, stride_dy, stride_dx, stride_scale, stride_partial,
    D: tl.constexpr, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    """Program c walks the one-row tiles of chunk c of the token schedule; per tile, BLOCK_M tokens per step, the
    next step's x and dy loaded into registers before this step is computed. The reduced gradients accumulate
    elementwise in (BLOCK_M, D) registers and are summed over the rows once per tile, so a step has one
    reduction (of proj and sum(dxhat)). Schedule chunks own only non-empty tiles: rows without tokens (possibly
    NaN rows of absent samples) are never read."""
    program = tl.program_id(0)
    cols = tl.arange(0, CHUNK)
    for tile in range(tl.load(chunk_tiles_ptr + program), tl.load(chunk_tiles_ptr + program + 1)):
        row = tl.load(tiles_ptr + tile).to(tl.int64)
        start = tl.load(tiles_ptr + num_tiles + tile)
        end = tl.load(tiles_ptr + 2 * num_tiles + tile)
        scale = _load_vector_chunks(scale_ptr + row * stride_scale, D, CHUNK, NUM_CHUNKS)
        acc_shift = ()
        acc_scale = ()
        acc_weight = ()
        acc_bias = ()
        for _ in tl.static_range(NUM_CHUNKS):
            acc_shift = acc_shift + (tl.zeros((BLOCK_M, CHUNK), tl.float32),)
            acc_scale = acc_scale + (tl.zeros((BLOCK_M, CHUNK), tl.float32),)
            if HAS_WEIGHT:
                acc_weight = acc_weight + (tl.zeros((BLOCK_M, CHUNK), tl.float32),)
            if HAS_BIAS:
                acc_bias = acc_bias + (tl.zeros((BLOCK_M, CHUNK), tl.float32),)
        pos = start + tl.arange(0, BLOCK_M)
        tokens = tl.load(order_ptr + pos, mask=pos < end, other=0).to(tl.int64)
        next_x = _load_chunks(x_ptr, tokens, stride_x, pos < end, D, CHUNK, NUM_CHUNKS)
        next_dy = _load_chunks(dy_ptr, tokens, stride_dy, pos < end, D, CHUNK, NUM_CHUNKS)
        for pos0 in range(start, end, BLOCK_M):
            x_raw, dy_raw, step_tokens = next_x, next_dy, tokens
            pos = pos0 + tl.arange(0, BLOCK_M)
            pos_mask = pos < end
            ahead = pos + BLOCK_M
            tokens = tl.load(order_ptr + ahead, mask=ahead < end, other=0).to(tl.int64)
            next_x = _load_chunks(x_ptr, tokens, stride_x, ahead < end, D, CHUNK, NUM_CHUNKS)
            next_dy = _load_chunks(dy_ptr, tokens, stride_dy, ahead < end, D, CHUNK, NUM_CHUNKS)

            rstd = tl.load(rstd_ptr + step_tokens, mask=pos_mask, other=0.0)
            shift_xhat = tl.zeros_like(rstd)
            if not IS_RMS:
                shift_xhat = tl.load(mean_ptr + step_tokens, mask=pos_mask, other=0.0) * rstd
            # Masked rows (x = dy = 0, rstd = 0) and padding columns (dy = 0) add nothing below.
            xhat = ()
            dxhat = ()
            proj = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
            dxhat_total = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
            new_shift = ()
            new_scale = ()
            new_weight = ()
            new_bias = ()
            for c in tl.static_range(NUM_CHUNKS):
                dy = dy_raw[c].to(tl.float32)
                xhat_c = x_raw[c].to(tl.float32) * rstd[:, None] - shift_xhat[:, None]
                dz = dy * (1.0 + scale[c])[None, :]
                z = xhat_c
                dxhat_c = dz
                # weight and bias are re-read per step (L1 hits) rather than held in registers.
                if HAS_WEIGHT:
                    weight = _load_vector(weight_ptr, c, 1.0, D, CHUNK)
                    z = z * weight[None, :]
                    dxhat_c = dz * weight[None, :]
                if HAS_BIAS:
                    z = z + _load_vector(bias_ptr, c, 0.0, D, CHUNK)[None, :]
                new_shift = new_shift + (acc_shift[c] + dy,)
                new_scale = new_scale + (acc_scale[c] + dy * z,)
                if HAS_WEIGHT:
                    new_weight = new_weight + (acc_weight[c] + dz * xhat_c,)
                if HAS_BIAS:
                    new_bias = new_bias + (acc_bias[c] + dz,)
                proj += dxhat_c * xhat_c
                dxhat_total += dxhat_c
                xhat = xhat + (xhat_c,)
                dxhat = dxhat + (dxhat_c,)
            acc_shift, acc_scale, acc_weight, acc_bias = new_shift, new_scale, new_weight, new_bias
            proj, dxhat_sum = tl.reduce((proj, dxhat_total), 1, _add_pairs)
            # dx = rstd * (dxhat - mean(dxhat) - xhat * proj / D), two FFMAs per element.
            xhat_coef = rstd * proj / D
            offset = rstd * dxhat_sum / D
            if IS_RMS:
                offset = tl.zeros_like(offset)
            dx = ()
            for c in tl.static_range(NUM_CHUNKS):
                dx = dx + (dxhat[c] * rstd[:, None] - (xhat[c] * xhat_coef[:, None] + offset[:, None]),)
            _store_chunks(dx_ptr, step_tokens, stride_dx, dx, pos_mask, D, CHUNK, NUM_CHUNKS)

        offset = tl.cast(tile, tl.int64) * stride_partial
        for c in tl.static_range(NUM_CHUNKS):
            col_mask = c * CHUNK + cols < D
            partial = offset + c * CHUNK + cols
            tl.store(partial_shift_ptr + partial, tl.sum(acc_shift[c], axis=0), mask=col_mask)
            tl.store(partial_scale_ptr + partial, tl.sum(acc_scale[c], axis=0), mask=col_mask)
            if HAS_WEIGHT:
                tl.store(partial_weight_ptr + partial, tl.sum(acc_weight[c], axis=0), mask=col_mask)
            if HAS_BIAS:
                tl.store(partial_bias_ptr + partial, tl.sum(acc_bias[c], axis=0), mask=col_mask)


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


def _row_launch(blocks: tu.RowBlocks) -> dict:
    return dict(BLOCK_M=blocks.block_m, CHUNK=blocks.chunk_d, NUM_CHUNKS=blocks.num_chunks,
                num_warps=blocks.num_warps)


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
    # RMSNorm's mean is zeros (returned, not written by the kernel); LayerNorm's is written by the kernel.
    mean = (torch.zeros if rms else torch.empty)(num_tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty(num_tokens, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return y, mean, rstd
    blocks = tu.row_blocks(width, affine=weight is not None or bias is not None)
    programs = min(triton.cdiv(num_tokens, blocks.block_m), blocks.ctas_per_sm * tu.num_sms(x.device))
    _modulated_norm_fwd[(programs,)](
        x, y, shift, scale, index, weight, bias, mean, rstd,
        num_tokens, shift.shape[0], x.stride(0), y.stride(0), shift.stride(0), scale.stride(0), eps, D=width,
        IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_row_launch(blocks),
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
    blocks = tu.row_blocks(width, backward=True, affine=weight is not None or bias is not None)
    tiles = tu.segment_tiles(index, num_rows, blocks.ctas_per_sm * tu.num_sms(x.device))
    # One (num_tiles, D) fp32 partial-sum buffer per reduced gradient: dshift, dscale[, dweight][, dbias].
    partials = torch.empty(2 + (weight is not None) + (bias is not None), tiles.num_tiles, width,
                           device=x.device, dtype=torch.float32).unbind(0)
    partial_weight = partials[2] if weight is not None else None
    partial_bias = partials[-1] if bias is not None else None
    # dweight and dbias sum every tile's partial; surplus tiles (no chunk writes them) must add zero.
    for buffer in (partial_weight, partial_bias):
        if buffer is not None:
            buffer.zero_()
    _modulated_norm_bwd[(tiles.num_chunks,)](
        x, dy, dx, scale, weight, bias, mean, rstd, tiles.order, tiles.tiles, tiles.chunk_tiles,
        partials[0], partials[1], partial_weight, partial_bias,
        tiles.num_tiles, x.stride(0), dy.stride(0), dx.stride(0), scale.stride(0), partials[0].stride(0), D=width,
        IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_row_launch(blocks),
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


def modulated_norm_traffic(num_tokens: int, width: int, num_rows: int, *, itemsize: int = 2,
                           table_itemsize: Optional[int] = None, rms: bool = False, affine: bool = False,
                           backward: bool = False, num_sms: int = 132) -> dict:
    """HBM bytes per token of the forward (or ``backward``) kernels against the minimum, an estimate for
    benchmarks: ``{"minimum": ..., "moved": ..., "extra": {reason: bytes}}``.

    The minimum reads x (and dy) once, writes y (dx) once and touches each modulation row once (shift, scale
    read; dshift, dscale written), plus weight/bias. The kernels also move, per token: the index (4 B) and
    the saved statistics (mean and rstd, 8 B; RMSNorm's mean is zeros, written but not read); the
    backward's segment schedule and partial sums (:func:`packdit.ops._triton_utils.segment_reduction_bytes`,
    for ``num_sms`` SMs). Modulation rows gathered per token are L2/L1 hits after their first read.
    """
    table_itemsize = itemsize if table_itemsize is None else table_itemsize
    row_bytes = width * table_itemsize
    params = 2 * width * itemsize if affine else 0
    n = max(num_tokens, 1)
    if not backward:
        minimum = 2 * width * itemsize + (2 * num_rows * row_bytes + params) / n
        extra = {"index": 4.0, "mean_rstd": 8.0}
    else:
        minimum = 3 * width * itemsize + (3 * num_rows * row_bytes + 2 * params) / n
        blocks = tu.row_blocks(width, backward=True, affine=affine)
        reduction = tu.segment_reduction_bytes(num_tokens, num_rows, blocks.ctas_per_sm * num_sms, width,
                                               2 + 2 * affine)
        extra = {"mean_rstd": 4.0 if rms else 8.0, **{k: v / n for k, v in reduction.items()}}
    return {"minimum": minimum, "moved": minimum + sum(extra.values()), "extra": extra}


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
