"""``fused_mlp``: the DiT MLP ``fc2(gelu_tanh(fc1(h)))`` with fused epilogues, optionally ending in the
adaLN-Zero gated residual.

Shapes: h (N, D_in), fc1_weight (H, D_in), fc1_bias (H,), fc2_weight (D_out, H), fc2_bias (D_out,)
(``nn.Linear`` layouts); optional residual x (N, D_out), gate (R, D_out), index (N,) int32::

    pre = h @ fc1_weight^T + fc1_bias              (N, H)      fc1 GEMM, epilogue: + bias, GELU
    act = gelu_tanh(pre)                           (N, H)
    f   = act @ fc2_weight^T + fc2_bias            (N, D_out)  fc2 GEMM, epilogue: + bias [, gated residual]
    out = f                        (no residual)
    out = x + gate[index] * f      (gated)

``gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))`` with ``tanh(a) = 2 sigmoid(2a) - 1``.

Forward: one Triton GEMM kernel (grouped tile order, fp32 accumulation, autotuned over tile shapes on a
GPU) with the epilogue selected at compile time. fc1's epilogue writes both ``pre`` and ``act``; fc2's
gated epilogue reads x and the gate row of each output row and writes ``out`` and ``f``.

Memory: autograd keeps ``pre`` (N*H elements, the one (N, H) activation saved) and recomputes ``act``
and ``gelu'(pre)`` in a single elementwise pass in the backward; ``act`` is freed after fc2. Saving act
as well would add another N*H (4 N*D at mlp_ratio 4) per block for no fewer GEMMs. The gated variant
also saves ``f`` (N*D_out, a quarter of ``pre`` at mlp_ratio 4), needed for dgate, instead of redoing
the fc2 GEMM.

Backward::

    df = dout * gate[index], dgate[r] = sum_{index[i]=r} dout_i * f_i, dx = dout   (gated_residual_backward)
    dact = df @ fc2_weight                         torch.matmul (cuBLAS)
    act, dpre = gelu(pre), dact * gelu'(pre)       one Triton elementwise pass
    dfc2_weight = df^T @ act, dfc2_bias = sum df   cuBLAS / torch.sum
    dfc1_weight = dpre^T @ h, dfc1_bias = sum dpre, dh = dpre @ fc1_weight

The five backward GEMMs use cuBLAS: they need transposed operands and have no epilogue besides the
GELU gradient, which costs one extra read+write of an (N, H) tensor next to ~6*N*D*H FLOPs; cuBLAS runs
these shapes near peak and a second tuned Triton GEMM per operand layout would not beat it. The dgate
reduction is deterministic (fixed-order segmented sum); the weight gradients are cuBLAS GEMMs and
``torch.sum``, deterministic for a fixed shape (cuBLAS given ``CUBLAS_WORKSPACE_CONFIG``, as PyTorch's
deterministic mode requires). Persistent / TMA GEMM variants for Hopper are not implemented.

Runs Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``). The oracle is
:func:`packdit.reference.mlp_reference`; :func:`packdit.fused_mlp` chooses between the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from packdit.ops import _triton_utils as tu
from packdit.ops.gated_residual import gated_residual_backward

__all__ = ["fused_mlp", "gelu_tanh_backward"]

_EPILOGUE_BIAS = 0
_EPILOGUE_GELU = 1
_EPILOGUE_GATED = 2

# Tile shapes from the Triton matmul tutorial's tuned list for A100/H100 bf16; the first one
# (64x64x32) is the only one under the interpreter.
_GEMM_TILE_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
_GEMM_CONFIGS = tu.autotune_configs(_GEMM_TILE_CONFIGS)


# Tuned per power-of-two bucket of M: packed batches change N tokens every step, and re-tuning
# (7 configs x benchmark runs) for every new M would cost more than it gains.
@triton.autotune(configs=_GEMM_CONFIGS, key=["m_bucket", "N", "K", "EPILOGUE"])
@triton.jit
def _linear_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, aux_ptr, res_ptr, gate_ptr, index_ptr,
    M, N, K, R, m_bucket,
    stride_am, stride_ak, stride_wn, stride_wk, stride_out, stride_aux, stride_res, stride_gate,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``acc = a @ w^T (+ bias)`` for a (M, K), w (N, K); then by EPILOGUE (``_EPILOGUE_*``):
    0 BIAS: out = acc. 1 GELU: aux = acc, out = gelu_tanh(acc). 2 GATED: aux = acc, out = res + gate[index] * acc.
    ``m_bucket`` = next_pow2(M) is only the autotuning key."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each loaded w column block while it is in L2.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    out_dtype = out_ptr.dtype.element_ty
    if EPILOGUE == 1:
        tl.store(aux_ptr + offs_m[:, None] * stride_aux + offs_n[None, :], acc.to(out_dtype), mask=mask)
        acc = tu.gelu_tanh(acc)
    elif EPILOGUE == 2:
        tl.store(aux_ptr + offs_m[:, None] * stride_aux + offs_n[None, :], acc.to(out_dtype), mask=mask)
        row = tl.load(index_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        row_mask = mask & ((row >= 0) & (row < R))[:, None]
        gate = tl.load(gate_ptr + row[:, None] * stride_gate + offs_n[None, :], mask=row_mask, other=float("nan"))
        res = tl.load(res_ptr + offs_m[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0)
        acc = res.to(tl.float32) + gate.to(tl.float32) * acc
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], acc.to(out_dtype), mask=mask)


_ELEMENTWISE_BLOCK = 1024


@triton.jit
def _gelu_tanh_bwd(pre_ptr, dact_ptr, dpre_ptr, act_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dact = tl.load(dact_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, grad = tu.gelu_tanh_and_grad(pre)
    tl.store(act_ptr + offs, act.to(act_ptr.dtype.element_ty), mask=mask)
    tl.store(dpre_ptr + offs, (dact * grad).to(dpre_ptr.dtype.element_ty), mask=mask)


def _linear(a: Tensor, w: Tensor, bias: Optional[Tensor], epilogue: int, res: Optional[Tensor] = None,
            gate: Optional[Tensor] = None, index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Launch :func:`_linear_kernel`: returns ``(out, aux)`` (aux empty for the BIAS epilogue)."""
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    aux = torch.empty(m, n, device=a.device, dtype=a.dtype) if epilogue != _EPILOGUE_BIAS else out.new_empty(0)
    if m == 0 or n == 0:
        return out, aux
    gated = epilogue == _EPILOGUE_GATED

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        a, w, bias, out, aux, res if gated else None, gate if gated else None, index if gated else None,
        m, n, k, gate.shape[0] if gated else 0, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), aux.stride(0) if aux.dim() == 2 else 0,
        res.stride(0) if gated else 0, gate.stride(0) if gated else 0,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
    )
    return out, aux


# ---------------------------------------------------------------------- checks
def _check_inputs(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index, values: bool = True) -> None:
    device = h.device
    tu.check_float("h", h, dims=2, device=device)
    tu.check_float("fc1_weight", fc1_weight, dims=2, device=device)
    tu.check_float("fc2_weight", fc2_weight, dims=2, device=device)
    hidden, d_in = fc1_weight.shape
    if h.shape[1] != d_in:
        raise ValueError(f"h: expected shape (N, {d_in}) to match fc1_weight {tuple(fc1_weight.shape)}, "
                         f"got {tuple(h.shape)}")
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight: expected shape (D_out, {hidden}) to match fc1_weight, "
                         f"got {tuple(fc2_weight.shape)}")
    for name, w in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight), ("fc1_bias", fc1_bias),
                    ("fc2_bias", fc2_bias)):
        if w is not None and w.dtype != h.dtype:
            raise ValueError(f"{name}: expected dtype {h.dtype} like h, got {w.dtype}")
    for name, b, size in (("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if b is not None:
            tu.check_float(name, b, dims=1, device=device)
            if b.shape[0] != size:
                raise ValueError(f"{name}: expected shape ({size},), got {tuple(b.shape)}")
    given = [t is not None for t in (x, gate, index)]
    if any(given) and not all(given):
        raise ValueError("x, gate, index: pass all three for the gated residual, or none")
    if x is not None:
        tu.check_float("x", x, dims=2, device=device)
        if x.shape != (h.shape[0], fc2_weight.shape[0]) or x.dtype != h.dtype:
            raise ValueError(f"x: expected shape ({h.shape[0]}, {fc2_weight.shape[0]}) and dtype {h.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        tu.check_rows("gate", gate, x.shape[1], device)
        tu.check_index("index", index, x.shape[0], gate.shape[0], device, values)


# ---------------------------------------------------------------------- custom ops
@torch.library.custom_op("packdit::fused_mlp", mutates_args=())
def _fused_mlp_op(
    h: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
    x: Optional[Tensor], gate: Optional[Tensor], index: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out (N, D_out), pre (N, H), f)``: f (N, D_out) with a gated residual, else empty."""
    _check_inputs(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index)
    gated = x is not None
    tu.require_triton("fused_mlp", h)
    act, pre = _linear(h, fc1_weight, fc1_bias, _EPILOGUE_GELU)
    if not gated:
        return _linear(act, fc2_weight, fc2_bias, _EPILOGUE_BIAS)[0], pre, h.new_empty(0)
    out, f = _linear(act, fc2_weight, fc2_bias, _EPILOGUE_GATED, x, gate, index)
    return out, pre, f


@_fused_mlp_op.register_fake
def _(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index):
    _check_inputs(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index, values=False)
    n, d_out, hidden = h.shape[0], fc2_weight.shape[0], fc1_weight.shape[0]
    f = h.new_empty(n, d_out) if x is not None else h.new_empty(0)
    return h.new_empty(n, d_out), h.new_empty(n, hidden), f


@torch.library.custom_op("packdit::gelu_tanh_backward", mutates_args=())
def gelu_tanh_backward(pre: Tensor, dact: Tensor) -> tuple[Tensor, Tensor]:
    """``(dpre, act) = (dact * gelu_tanh'(pre), gelu_tanh(pre))`` elementwise, in pre's dtype; one pass."""
    if pre.shape != dact.shape:
        raise ValueError(f"dact: expected shape {tuple(pre.shape)} like pre, got {tuple(dact.shape)}")
    pre, dact = pre.contiguous(), dact.contiguous()
    dpre, act = torch.empty_like(pre), torch.empty_like(pre)
    if pre.numel():
        _gelu_tanh_bwd[(triton.cdiv(pre.numel(), _ELEMENTWISE_BLOCK),)](
            pre, dact, dpre, act, pre.numel(), BLOCK=_ELEMENTWISE_BLOCK)
    return dpre, act


@gelu_tanh_backward.register_fake
def _(pre, dact):
    return torch.empty_like(pre, memory_format=torch.contiguous_format), torch.empty_like(
        pre, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index = inputs
    _, pre, f = output
    ctx.save_for_backward(h, fc1_weight, fc2_weight, gate, index, pre, f)
    ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in (fc1_bias, fc2_bias))
    ctx.gated = x is not None
    ctx.mark_non_differentiable(pre, f)


def _bias_grad(grad: Tensor, dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """Sum over tokens in fp32; None for an absent bias (dtype None)."""
    return None if dtype is None else grad.sum(0, dtype=torch.float32).to(dtype)


def _backward(ctx, dout, _dpre, _df):
    h, fc1_weight, fc2_weight, gate, index, pre, f = ctx.saved_tensors
    dx = dgate = None
    if ctx.gated:
        df, dgate = gated_residual_backward(dout, f, gate, index)
        dx = dout
    else:
        df = dout
    dpre, act = gelu_tanh_backward(pre, df @ fc2_weight)
    dfc2_weight = df.t() @ act
    dfc1_weight = dpre.t() @ h
    dh = dpre @ fc1_weight
    return (dh, dfc1_weight, _bias_grad(dpre, ctx.bias_dtypes[0]), dfc2_weight,
            _bias_grad(df, ctx.bias_dtypes[1]), dx, dgate, None)


_fused_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def fused_mlp(
    h: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    x: Optional[Tensor] = None,
    gate: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
) -> Tensor:
    """``fc2(gelu_tanh(fc1(h)))``, or ``x + gate[index] * fc2(gelu_tanh(fc1(h)))`` with x, gate, index.

    h (N, D_in), fc1_weight (H, D_in), fc1_bias (H,) or None, fc2_weight (D_out, H), fc2_bias (D_out,)
    or None, x (N, D_out), gate (R, D_out), index (N,) int32 -> (N, D_out) in h's dtype. Weights, biases
    and x must have h's dtype; gate may be any float dtype. See the module docstring.
    """
    return _fused_mlp_op(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index)[0]
