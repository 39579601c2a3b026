"""``qk_norm_rope``: per-head RMSNorm and 3-D rotary embedding of queries / keys, once per layer, in Triton.

Math, for ``x (N, H, D)`` (tokens, heads, head dim), optional ``weight (H, D)``, ``positions (N, 3)`` int32
``(t, h, w)`` and a :class:`~packdit.RoPE3D`::

    xhat = x * rstd,  rstd = 1 / sqrt(mean_d(x^2) + eps)          (if weight is given: the QK-norm)
    z = xhat * weight                                              (else z = x)
    y = R(positions) z                                             (if rope is given, else y = z)

``R`` rotates interleaved pairs ``(2j, 2j+1)`` by ``pos_a * theta ** (-2 i / d_a)`` (pair j is pair i of axis a;
see :mod:`packdit.reference.rope`). Backward, with ``dz = R^T dy`` (the inverse rotation)::

    dweight[h] = sum_n dz[n, h] * xhat[n, h]      dx = rstd * (dz * weight - xhat * mean_d(dz * weight * xhat))

Why a separate pass: rotating inside the attention loops recomputes every key block's rotation once per
query tile (32x at L = 4,096), and ``tl.sin``/``tl.cos`` are ~90-instruction libdevice polynomials with a
local-memory slow path: they quadrupled the forward's main loop. Here each token's angles are computed once
and applied to all its heads, fused with the QK-norm that reads and writes the same rows anyway; the
attention kernels then run without RoPE. The backward's inverse rotation is part of the QK-norm backward.

Layouts: ``x`` may be a strided view (the q|k heads of a fused qkv projection, row stride 3 H D), last dim
contiguous; ``weight`` may be an expanded view (stride 0 over heads); ``y`` and ``dx`` are contiguous. Strides
arrive in units of ``ALIGN`` elements (``_triton_utils.stride_alignment``), so at head dim 72 (a head stride of
144 B) the rows still load in 16-byte vectors. Kernels compute in fp32. A program takes BLOCK_T tokens and
loops over the heads, so the angles (BLOCK_T, D/2) are computed once per program, and the pipeliner keeps the
next two heads' rows in flight (cp.async, _HEAD_STAGES) while it normalises and rotates this one; ``dweight`` is
reduced as one fp32 partial sum per program and head, added in program order (bitwise deterministic).

Oracle: ``apply_rope_3d(F.rms_norm(x, (D,), eps=eps) * weight, positions, rope)`` in float64
(:mod:`packdit.reference.rope`); RoFormer (arXiv 2104.09864) for the rotation, ViT-22B (arXiv 2302.05442) for
the QK-norm.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit.ops import _triton_utils as tu
from packdit.rope import RoPE3D

__all__ = ["qk_norm_rope", "rope_rotate"]

# Tile per head and program: 4,096 fp32 values, 16 per thread at 8 warps, beside the angles' cos and sin (half as
# many each). Compiled for sm_90 at D = 72 and 128 (bf16), 8,192 values per tile at 4 warps spill ~1 KB.
_TILE_ELEMENTS = 4096
_NUM_WARPS = 8
# Heads in flight per program: the pass is memory-bound, and an un-pipelined head loop waits for each head's rows
# before it computes, with only a few programs per SM to cover the wait. Compiled for sm_90 (bf16, D = 128,
# QK-norm and RoPE, 32 tokens = 8 KB per tensor and head), one stage: 4 forward programs per SM (57 registers)
# with 32 KB of loads in flight, 2 backward programs (101 registers, dy and x) with 32 KB, and only while they
# wait, against the 22-36 KB per SM that 4.8 TB/s needs at 0.6-1 us of memory latency (H200, Little's law). Three
# stages (two heads loading while one computes): 64 KB in flight for both (61 / 113 registers, 16.5 / 36.5 KiB
# of shared memory, the same programs per SM). Estimates from the compiled code, not timed.
_HEAD_STAGES = 3


@triton.jit
def _cos_sin(x):
    """``(cos(x), sin(x))`` of fp32 ``x`` for |x| < 2^13 (RoPE angles: position x frequency <= 1), ~1 ulp: Cody-Waite
    reduction by pi/2 with a three-part constant, then the Cephes minimax polynomials on [-pi/4, pi/4]. Unlike
    libdevice's sinf/cosf it has no Payne-Hanek path for huge arguments, whose local-memory array costs every
    thread a stack frame."""
    quadrant = tl.floor(x * 0.6366197723675814 + 0.5)
    r = x - quadrant * 1.5703125
    r = r - quadrant * 4.837512969970703125e-4
    r = r - quadrant * 7.54978995489188216e-8
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    q = quadrant.to(tl.int32) & 3  # x = q pi/2 + r: cos and sin rotate through (c, s), (-s, c), (-c, -s), (s, -c)
    cos = tl.where(q == 0, cos_r, tl.where(q == 1, -sin_r, tl.where(q == 2, -cos_r, sin_r)))
    sin = tl.where(q == 0, sin_r, tl.where(q == 1, cos_r, tl.where(q == 2, -sin_r, -cos_r)))
    return cos, sin


@triton.jit
def rope_angles(pos_ptr, rows, row_valid, log2_theta, BLOCK_D: tl.constexpr, AX_T: tl.constexpr,
                AX_H: tl.constexpr, AX_W: tl.constexpr):
    """``(cos, sin)``, each ``(len(rows), BLOCK_D // 2)`` fp32, of the 3-D RoPE angles of ``rows`` (positions
    ``pos_ptr[row * 3 + axis]``); pairs past ``AX_T + AX_H + AX_W`` get angle 0."""
    pair = tl.arange(0, BLOCK_D // 2)
    in_t = pair < AX_T // 2
    in_h = (pair >= AX_T // 2) & (pair < (AX_T + AX_H) // 2)
    in_w = (pair >= (AX_T + AX_H) // 2) & (pair < (AX_T + AX_H + AX_W) // 2)
    index = tl.where(in_t, pair, tl.where(in_h, pair - AX_T // 2, pair - (AX_T + AX_H) // 2))
    width = tl.maximum(tl.where(in_t, AX_T, tl.where(in_h, AX_H, AX_W)), 1)
    # theta ** (-2 i / d_a); pair 0 of each axis turns at frequency 1 for any theta, also inf (not 0 * inf = NaN)
    inv_freq = tl.exp2(tl.where(index == 0, 0.0, log2_theta) * (-2.0 * index.to(tl.float32) / width))
    offsets = rows.to(tl.int64) * 3
    pos_t = tl.load(pos_ptr + offsets, mask=row_valid, other=0).to(tl.float32)
    pos_h = tl.load(pos_ptr + offsets + 1, mask=row_valid, other=0).to(tl.float32)
    pos_w = tl.load(pos_ptr + offsets + 2, mask=row_valid, other=0).to(tl.float32)
    pos = tl.where(in_t[None, :], pos_t[:, None], tl.where(in_h[None, :], pos_h[:, None], pos_w[:, None]))
    angle = tl.where((in_t | in_h | in_w)[None, :], pos * inv_freq[None, :], 0.0)
    return _cos_sin(angle)


@triton.jit
def rope_rotate(x, cos, sin, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the interleaved pairs of ``x (BLOCK, BLOCK_D)`` fp32 by angles with ``cos``/``sin``
    ``(BLOCK, BLOCK_D // 2)`` (pass ``-sin`` for the inverse rotation)."""
    even, odd = tl.split(tl.reshape(x, (BLOCK, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK, BLOCK_D))


@triton.jit
def _token_tile(Pos, num_tokens, log2_theta, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                ROPE: tl.constexpr, AX_T: tl.constexpr, AX_H: tl.constexpr, AX_W: tl.constexpr):
    """The program's BLOCK_T tokens: ``(rows (int64), columns, mask, cos, sin)``; cos / sin are unused zeros
    without RoPE."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_valid = rows < num_tokens
    cols = tl.arange(0, BLOCK_D)
    cos = tl.zeros((BLOCK_T, BLOCK_D // 2), tl.float32)
    sin = cos
    if ROPE:
        cos, sin = rope_angles(Pos, rows, row_valid, log2_theta, BLOCK_D, AX_T, AX_H, AX_W)
    return rows.to(tl.int64), cols, row_valid[:, None] & (cols < HEAD_DIM)[None, :], cos, sin


@triton.jit
def _qk_norm_rope_fwd_kernel(
    X, W, Pos, Y, num_tokens, num_heads, stride_xn, stride_xh, stride_wh, stride_yn, stride_yh, eps, log2_theta,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
    AX_T: tl.constexpr, AX_H: tl.constexpr, AX_W: tl.constexpr, ALIGN: tl.constexpr, HEAD_STAGES: tl.constexpr,
):
    rows64, cols, mask, cos, sin = _token_tile(Pos, num_tokens, log2_theta, HEAD_DIM, BLOCK_D, BLOCK_T, ROPE, AX_T,
                                              AX_H, AX_W)
    for head in tl.range(num_heads, num_stages=HEAD_STAGES):
        x = tl.load(X + (rows64[:, None] * stride_xn + head * stride_xh) * ALIGN + cols[None, :], mask=mask,
                    other=0.0)
        z = x.to(tl.float32)
        if NORM:
            rstd = tl.math.rsqrt(tl.sum(z * z, 1) / HEAD_DIM + eps)
            weight = tl.load(W + head * stride_wh * ALIGN + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)
            z = z * rstd[:, None] * weight[None, :]
        if ROPE:
            z = rope_rotate(z, cos, sin, BLOCK_T, BLOCK_D)
        tl.store(Y + (rows64[:, None] * stride_yn + head * stride_yh) * ALIGN + cols[None, :],
                 z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DY, X, W, Pos, DX, DWPartial, num_tokens, num_heads, stride_dyn, stride_dyh, stride_xn, stride_xh, stride_wh,
    stride_dxn, stride_dxh, eps, log2_theta,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
    AX_T: tl.constexpr, AX_H: tl.constexpr, AX_W: tl.constexpr, ALIGN: tl.constexpr, HEAD_STAGES: tl.constexpr,
):
    block = tl.program_id(0)
    rows64, cols, mask, cos, sin = _token_tile(Pos, num_tokens, log2_theta, HEAD_DIM, BLOCK_D, BLOCK_T, ROPE, AX_T,
                                              AX_H, AX_W)
    col_valid = cols < HEAD_DIM
    for head in tl.range(num_heads, num_stages=HEAD_STAGES):
        dz = tl.load(DY + (rows64[:, None] * stride_dyn + head * stride_dyh) * ALIGN + cols[None, :], mask=mask,
                     other=0.0)
        dz = dz.to(tl.float32)
        if ROPE:
            dz = rope_rotate(dz, cos, -sin, BLOCK_T, BLOCK_D)
        if NORM:
            x = tl.load(X + (rows64[:, None] * stride_xn + head * stride_xh) * ALIGN + cols[None, :], mask=mask,
                        other=0.0)
            x = x.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)
            xhat = x * rstd[:, None]
            weight = tl.load(W + head * stride_wh * ALIGN + cols, mask=col_valid, other=0.0).to(tl.float32)
            tl.store(DWPartial + (block * num_heads + head) * BLOCK_D + cols, tl.sum(dz * xhat, 0))
            dxhat = dz * weight[None, :]
            dz = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, 1) / HEAD_DIM)[:, None])
        tl.store(DX + (rows64[:, None] * stride_dxn + head * stride_dxh) * ALIGN + cols[None, :],
                 dz.to(DX.dtype.element_ty), mask=mask)


def _launch_shape(head_dim: int) -> tuple[int, int]:
    block_d = max(2, triton.next_power_of_2(head_dim))
    return block_d, max(1, min(64, _TILE_ELEMENTS // block_d))


def _launch_options() -> dict:
    return {} if tu.interpreting() else {"num_warps": _NUM_WARPS}


def _rope_args(rope_axes: list[int]) -> dict:
    return dict(ROPE=any(rope_axes), AX_T=rope_axes[0], AX_H=rope_axes[1], AX_W=rope_axes[2])


@torch.library.custom_op("packdit::qk_norm_rope_fwd", mutates_args=())
def qk_norm_rope_fwd(x: Tensor, weight: Optional[Tensor], positions: Optional[Tensor], eps: float, rope_theta: float,
                     rope_axes: list[int]) -> Tensor:
    tu.require_triton("qk_norm_rope", x)
    num_tokens, num_heads, head_dim = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_d, block_t = _launch_shape(head_dim)
    w = weight if weight is not None else x[0]  # (H, D); unread without NORM
    align = tu.stride_alignment(x.element_size(), x, w, y)
    _qk_norm_rope_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        x, w, positions if positions is not None else x, y, num_tokens, num_heads,
        *tu.unit_strides(align, x, w, y), eps, math.log2(rope_theta) if any(rope_axes) else 0.0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, NORM=weight is not None, ALIGN=align,
        HEAD_STAGES=_HEAD_STAGES,
        **_rope_args(rope_axes), **_launch_options(),
    )
    return y


@qk_norm_rope_fwd.register_fake
def _(x, weight, positions, eps, rope_theta, rope_axes):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("packdit::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd(grad: Tensor, x: Tensor, weight: Optional[Tensor], positions: Optional[Tensor], eps: float,
                     rope_theta: float, rope_axes: list[int]) -> tuple[Tensor, Tensor]:
    """``(dx (N, H, D) x.dtype, dweight (H, D) fp32)``; dweight is empty without ``weight``."""
    tu.require_triton("qk_norm_rope", x)
    num_tokens, num_heads, head_dim = x.shape
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_d, block_t = _launch_shape(head_dim)
    blocks = triton.cdiv(num_tokens, block_t)
    norm = weight is not None
    partials = torch.empty((blocks if norm else 0, num_heads, block_d), dtype=torch.float32, device=x.device)
    if dx.numel():
        w = weight if norm else x[0]  # (H, D); unread without NORM
        align = tu.stride_alignment(x.element_size(), grad, x, w, dx)
        _qk_norm_rope_bwd_kernel[(blocks,)](
            grad, x, w, positions if positions is not None else x, dx, partials, num_tokens, num_heads,
            *tu.unit_strides(align, grad, x, w, dx), eps, math.log2(rope_theta) if any(rope_axes) else 0.0,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, NORM=norm, ALIGN=align, HEAD_STAGES=_HEAD_STAGES,
            **_rope_args(rope_axes), **_launch_options(),
        )
    if not norm:
        return dx, torch.empty(0, dtype=torch.float32, device=x.device)
    return dx, partials.sum(0)[:, :head_dim]


@qk_norm_rope_bwd.register_fake
def _(grad, x, weight, positions, eps, rope_theta, rope_axes):
    shape = (x.shape[1], x.shape[2]) if weight is not None else (0,)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, positions, eps, rope_theta, rope_axes = inputs
    ctx.save_for_backward(x if weight is not None else None, weight, positions)
    ctx.shape, ctx.eps, ctx.rope_theta, ctx.rope_axes = x.shape, eps, rope_theta, rope_axes


def _backward(ctx, grad):
    x, weight, positions = ctx.saved_tensors
    if x is None:  # rotation only: x is not needed, only its shape, dtype and device
        x = grad.new_empty(ctx.shape)
    dx, dweight = qk_norm_rope_bwd(grad, x, weight, positions, ctx.eps, ctx.rope_theta, ctx.rope_axes)
    return dx, (dweight.to(weight.dtype) if weight is not None else None), None, None, None, None


qk_norm_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(x: Tensor, weight: Tensor | None = None, positions: Tensor | None = None,
                 rope: RoPE3D | None = None, *, eps: float = 1e-6) -> Tensor:
    """Per-head RMSNorm (``weight`` given) then 3-D RoPE (``rope`` given) of ``x (N, H, D)``; see the module
    docstring. ``weight``: ``(H, D)`` (an expanded ``(D,)`` view is fine); ``positions``: ``(N, 3)`` int32, needed
    with ``rope``. Returns a contiguous ``(N, H, D)`` tensor in ``x.dtype``; differentiable in x and weight.

    Equivalent PyTorch: ``apply_rope_3d(F.rms_norm(x, (D,), eps=eps) * weight, positions, rope)``.
    """
    tu.check_float("x", x, dims=3, device=x.device)
    num_tokens, num_heads, head_dim = x.shape
    if weight is not None:
        tu.check_float("weight", weight, dims=2, device=x.device)
        if weight.shape != (num_heads, head_dim):
            raise ValueError(f"weight: expected shape ({num_heads}, {head_dim}) (heads, head_dim), got "
                             f"{tuple(weight.shape)}")
    axes = [0, 0, 0]
    if rope is not None:
        if not isinstance(rope, RoPE3D):
            raise ValueError(f"rope: expected a packdit.RoPE3D, got {type(rope).__name__}")
        rope.check_head_dim(head_dim)
        if not isinstance(positions, Tensor) or positions.dtype != torch.int32 or positions.shape != (num_tokens, 3):
            raise ValueError(f"positions: expected a ({num_tokens}, 3) int32 tensor for rope, got "
                             f"{getattr(positions, 'dtype', type(positions).__name__)} of shape "
                             f"{tuple(getattr(positions, 'shape', ()))}")
        if positions.device != x.device or not positions.is_contiguous():
            raise ValueError(f"positions: expected a contiguous tensor on {x.device}, got {positions.device}")
        axes = list(rope.axes_dims)
    return qk_norm_rope_fwd(x, weight, positions if rope is not None else None, float(eps),
                            float(rope.theta) if rope is not None else 0.0, axes)
