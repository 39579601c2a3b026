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

Forward: two Triton GEMMs (fp32 accumulation, grouped tile order, autotuned over tile shapes on a GPU)
with the epilogue selected at compile time. fc1's epilogue writes both ``pre`` and ``act``; fc2's gated
epilogue reads x and the gate row of each output row and writes ``out`` and ``f``.

Two GEMM kernels share the tile order and the epilogue code:

* ``_linear_tma_kernel`` (sm_90, and the interpreter): persistent (one program per SM walks the output
  tiles in grouped order), operands and epilogue tiles moved by TMA tensor descriptors, the K loop
  software-pipelined into wgmma. Needs every 2-D operand 16-byte aligned with row strides of a multiple of
  16 bytes (DiT widths are multiples of 8 elements).
* ``_linear_kernel``: one program per tile, pointer loads pipelined with cp.async; sm_80 and operands TMA
  cannot describe.

The epilogue runs on column sub-tiles of the accumulator (``SUBTILES``): its extra tiles (x, gate rows,
GELU temporaries) then hold BLOCK_N / SUBTILES columns beside the accumulator, which keeps the wide tiles
free of register spills and the wgmma pipeline unserialised.

Memory: autograd keeps ``pre`` (N*H elements, the one (N, H) activation saved) and recomputes ``act``
in the backward; ``act`` is freed after fc2. Saving act as well would add another N*H (4 N*D at
mlp_ratio 4) per block for no fewer GEMMs. The gated variant also saves ``f`` (N*D_out, a quarter of
``pre`` at mlp_ratio 4), needed for dgate, instead of redoing the fc2 GEMM.

Backward::

    df = dout * gate[index], dgate[r] = sum_{index[i]=r} dout_i * f_i, dx = dout   (gated_residual_backward)
    dpre = (df @ fc2_weight) * gelu'(pre), act = gelu(pre)   dgrad GEMM, epilogue: GELU gradient (Triton)
    dfc2_weight = df^T @ act, dfc2_bias = sum df             cuBLAS / torch.sum
    dfc1_weight = dpre^T @ h, dfc1_bias = sum dpre, dh = dpre @ fc1_weight

The GELU gradient is the epilogue of the dgrad GEMM: it reads ``pre`` and writes ``dpre`` and ``act``, so
``dact`` (N, H) is never written to memory nor read back (one read and one write of N*H elements fewer
than a separate elementwise pass). The other four GEMMs use cuBLAS: they have no epilogue and need
transposed operands (df^T, dpre^T), which cuBLAS runs near peak. The dgate reduction is deterministic
(fixed-order segmented sum); the Triton GEMMs have no split-K; the weight gradients are cuBLAS GEMMs and
``torch.sum``, deterministic for a fixed shape (cuBLAS given ``CUBLAS_WORKSPACE_CONFIG``, as PyTorch's
deterministic mode requires).

Runs Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``). The oracle is
:func:`packdit.reference.mlp_reference`; :func:`packdit.fused_mlp` chooses between the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from packdit.ops import _triton_utils as tu
from packdit.ops.gated_residual import gated_residual_backward

__all__ = ["fused_mlp", "gelu_tanh_backward"]

_EPILOGUE_BIAS = 0
_EPILOGUE_GELU = 1
_EPILOGUE_GATED = 2
_EPILOGUE_GELU_GRAD = 3


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int, subtiles: int, **kw) -> triton.Config:
    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "SUBTILES": subtiles}
    return triton.Config(tiles, num_warps=warps, num_stages=stages, **kw)


def _set_block_shapes(nargs: dict) -> None:
    """Autotuning pre-hook of the TMA kernel: the block shape of each tensor descriptor for this configuration."""
    block_m, block_n, block_k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [block_m, block_k]
    nargs["w_desc"].block_shape = [block_k, block_n] if nargs["W_KN"] else [block_n, block_k]
    for name in ("out_desc", "aux_desc", "src_desc"):
        if nargs[name] is not None:
            nargs[name].block_shape = [block_m, block_n // nargs["SUBTILES"]]


# Tile shapes (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages, epilogue sub-tiles), each checked on the compiled sm_90
# code: no register spills, no serialised wgmma (ptxas C7515) and at most 0.7 instruction-issue cycles per
# tensor-core cycle in the main loop, for every epilogue. Smaller tiles (128x64x32, 64x64x32 with 4 warps) issue
# 0.8-1.3 cycles of instructions per MMA cycle and are left out. The first configuration is the only one under
# the interpreter.
_GEMM_TILE_CONFIGS = [  # pointer kernel (cp.async): sm_80, and operands TMA cannot describe
    _config(128, 128, 64, 8, 4, 2),
    _config(128, 256, 64, 8, 3, 4),
    _config(256, 128, 64, 8, 3, 4),
    _config(128, 128, 32, 4, 4, 4),
    _config(64, 256, 32, 4, 4, 4),
]
_TMA_TILE_CONFIGS = [  # persistent TMA kernel: sm_90
    _config(128, 128, 64, 8, 4, 2, pre_hook=_set_block_shapes),
    _config(128, 256, 64, 8, 3, 4, pre_hook=_set_block_shapes),
    _config(128, 256, 64, 8, 4, 4, pre_hook=_set_block_shapes),
    _config(256, 128, 64, 8, 3, 4, pre_hook=_set_block_shapes),
    _config(128, 128, 64, 4, 4, 4, pre_hook=_set_block_shapes),
    _config(64, 128, 64, 4, 4, 2, pre_hook=_set_block_shapes),
    _config(128, 64, 64, 4, 4, 1, pre_hook=_set_block_shapes),
]

# ---------------------------------------------------------------------- epilogue
@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row blocks run one after another on each column block, so the w column
    block they share is read from HBM once and then from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (tile // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group_size) % rows_in_group
    pid_n = (tile % group_size) // rows_in_group
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _load_tile(src, stride, off_m, off_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile at (off_m, off_n) of an (M, N) tensor: a tensor descriptor (TMA) or a pointer
    with row stride ``stride``; zeros outside."""
    if TMA:
        tile = src.load([off_m, off_n])
    else:
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = off_n + tl.arange(0, BLOCK_N)
        tile = tl.load(src + rows[:, None] * stride + cols[None, :], mask=(rows < M)[:, None] & (cols < N)[None, :],
                       other=0.0)
    return tile


@triton.jit
def _store_tile(dst, stride, value, off_m, off_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TMA: tl.constexpr):
    """Store ``value`` as the tile at (off_m, off_n) of an (M, N) tensor (see :func:`_load_tile`)."""
    if TMA:
        dst.store([off_m, off_n], value.to(dst.dtype))
    else:
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = off_n + tl.arange(0, BLOCK_N)
        tl.store(dst + rows[:, None] * stride + cols[None, :], value.to(dst.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _epilogue_tile(
    acc, off_m, off_n, M, N, R, out, aux, src, stride_out, stride_aux, stride_src, bias_ptr, gate_ptr, index_ptr,
    stride_gate, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The epilogue of one (BLOCK_M, BLOCK_N) fp32 accumulator tile (``_EPILOGUE_*``; u = acc + bias):
    0 BIAS: out = u. 1 GELU: aux = u, out = gelu_tanh(u). 2 GATED: aux = u, out = src + gate[index] * u.
    3 GELU_GRAD: out = u * gelu_tanh'(src), aux = gelu_tanh(src) (src = pre)."""
    cols = off_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:
        out_value = acc
    elif EPILOGUE == 1:
        _store_tile(aux, stride_aux, acc, off_m, off_n, M, N, BLOCK_M, BLOCK_N, TMA)
        out_value = tu.gelu_tanh(acc)
    elif EPILOGUE == 2:
        _store_tile(aux, stride_aux, acc, off_m, off_n, M, N, BLOCK_M, BLOCK_N, TMA)
        rows = off_m + tl.arange(0, BLOCK_M)
        row = tl.load(index_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        # Out-of-range rows read nothing and give NaN (values are only checked on the host for CPU inputs).
        row_mask = ((rows < M) & (row >= 0) & (row < R))[:, None] & (cols < N)[None, :]
        gate = tl.load(gate_ptr + row[:, None] * stride_gate + cols[None, :], mask=row_mask, other=float("nan"))
        res = _load_tile(src, stride_src, off_m, off_n, M, N, BLOCK_M, BLOCK_N, TMA)
        out_value = res.to(tl.float32) + gate.to(tl.float32) * acc
    else:
        pre = _load_tile(src, stride_src, off_m, off_n, M, N, BLOCK_M, BLOCK_N, TMA).to(tl.float32)
        act, grad = tu.gelu_tanh_and_grad(pre)
        _store_tile(aux, stride_aux, act, off_m, off_n, M, N, BLOCK_M, BLOCK_N, TMA)
        out_value = acc * grad
    _store_tile(out, stride_out, out_value, off_m, off_n, M, N, BLOCK_M, BLOCK_N, TMA)


@triton.jit
def _split_columns(tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) -> its left and right (BLOCK_M, BLOCK_N // 2) halves."""
    return tl.split(tl.permute(tl.reshape(tile, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(
    acc, off_m, off_n, M, N, R, out, aux, src, stride_out, stride_aux, stride_src, bias_ptr, gate_ptr, index_ptr,
    stride_gate, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILES: tl.constexpr,
):
    """:func:`_epilogue_tile` on SUBTILES (1, 2 or 4) column sub-tiles of the accumulator one after another: the
    epilogue's own tiles (src, gate rows, GELU temporaries) then need registers for BLOCK_N / SUBTILES columns
    only, next to the accumulator's BLOCK_M * BLOCK_N fp32 values."""
    if SUBTILES == 1:
        _epilogue_tile(acc, off_m, off_n, M, N, R, out, aux, src, stride_out, stride_aux, stride_src, bias_ptr,
                       gate_ptr, index_ptr, stride_gate, EPILOGUE, HAS_BIAS, TMA, BLOCK_M, BLOCK_N)
    else:
        half: tl.constexpr = BLOCK_N // 2
        left, right = _split_columns(acc, BLOCK_M, BLOCK_N)
        _epilogue(left, off_m, off_n, M, N, R, out, aux, src, stride_out, stride_aux, stride_src, bias_ptr,
                  gate_ptr, index_ptr, stride_gate, EPILOGUE, HAS_BIAS, TMA, BLOCK_M, half, SUBTILES // 2)
        _epilogue(right, off_m, off_n + half, M, N, R, out, aux, src, stride_out, stride_aux, stride_src, bias_ptr,
                  gate_ptr, index_ptr, stride_gate, EPILOGUE, HAS_BIAS, TMA, BLOCK_M, half, SUBTILES // 2)


# ---------------------------------------------------------------------- GEMM kernels
# Tuned per power-of-two bucket of M: packed batches change N tokens every step, and re-tuning for every new M
# would cost more than it gains.
@triton.autotune(configs=tu.autotune_configs(_GEMM_TILE_CONFIGS), key=["m_bucket", "N", "K", "EPILOGUE"])
@triton.jit
def _linear_kernel(
    a_ptr, w_ptr, bias_ptr, out_ptr, aux_ptr, src_ptr, gate_ptr, index_ptr,
    M, N, K, R, m_bucket,
    stride_am, stride_ak, stride_wn, stride_wk, stride_out, stride_aux, stride_src, stride_gate,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    """``acc = a @ w^T`` for a (M, K), w (N, K) with any strides (pointer loads, cp.async pipelined), then
    :func:`_epilogue`. One program per output tile. ``m_bucket`` = next_pow2(M) is only the autotuning key."""
    off_m, off_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
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
        acc = tl.dot(a, w, acc, input_precision="ieee" if IEEE else None)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    _epilogue(acc, off_m, off_n, M, N, R, out_ptr, aux_ptr, src_ptr, stride_out, stride_aux, stride_src, bias_ptr,
              gate_ptr, index_ptr, stride_gate, EPILOGUE, HAS_BIAS, False, BLOCK_M, BLOCK_N, SUBTILES)


@triton.autotune(configs=tu.autotune_configs(_TMA_TILE_CONFIGS), key=["m_bucket", "N", "K", "EPILOGUE", "W_KN"])
@triton.jit
def _linear_tma_kernel(
    a_desc, w_desc, bias_ptr, out_desc, aux_desc, src_desc, gate_ptr, index_ptr,
    M, N, K, R, m_bucket, stride_gate,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, W_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    """``acc = a @ w^T`` (w (N, K)) or ``a @ w`` (W_KN: w (K, N)) through TMA tensor descriptors, then
    :func:`_epilogue` with TMA stores of BLOCK_N / SUBTILES columns. Persistent: the grid is at most one program
    per SM; program p runs tiles p, p + grid, ... in grouped order, and the tile and K loops are flattened
    into one software pipeline, so the next tile's first loads are in flight during this tile's epilogue."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            off_k = kt * BLOCK_K
            a = a_desc.load([off_m, off_k])
            if W_KN:
                w = w_desc.load([off_k, off_n])
            else:
                w = w_desc.load([off_n, off_k]).T
            acc = tl.dot(a, w, acc, input_precision="ieee" if IEEE else None)
        _epilogue(acc, off_m, off_n, M, N, R, out_desc, aux_desc, src_desc, 0, 0, 0, bias_ptr, gate_ptr, index_ptr,
                  stride_gate, EPILOGUE, HAS_BIAS, True, BLOCK_M, BLOCK_N, SUBTILES)


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


def _tma_compatible(*tensors: Tensor) -> bool:
    """Whether the TMA kernel can run: sm_90+ (or the interpreter) and every 2-D operand with a 16-byte aligned
    base, a contiguous last dimension and a row stride of a multiple of 16 bytes, none of them empty."""
    describable = (t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(1) == 1
                   and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)
    return tu.tma_capable(tensors[0].device) and all(describable)


def _linear(a: Tensor, w: Tensor, bias: Optional[Tensor], epilogue: int, *, w_kn: bool = False,
            src: Optional[Tensor] = None, gate: Optional[Tensor] = None,
            index: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``(out, aux)`` of ``acc = a @ w^T + bias`` (``a @ w`` with ``w_kn``: w is (K, N)) and the epilogue
    (``_EPILOGUE_*``; src: the residual x for GATED, pre for GELU_GRAD); aux is None for BIAS.

    Runs the persistent TMA kernel where :func:`_tma_compatible`, else the pointer kernel."""
    m, k = a.shape
    n = w.shape[1] if w_kn else w.shape[0]
    out = a.new_empty(m, n)
    aux = a.new_empty(m, n) if epilogue != _EPILOGUE_BIAS else None
    if m == 0 or n == 0:
        return out, aux
    num_rows = gate.shape[0] if gate is not None else 0
    stride_gate = gate.stride(0) if gate is not None else 0
    flags = dict(EPILOGUE=epilogue, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32)
    tensors = [t for t in (a, w, out, aux, src) if t is not None]
    if _tma_compatible(*tensors):
        # Block shapes are placeholders, set per configuration by _set_block_shapes.
        a_desc, w_desc, out_desc, aux_desc, src_desc = (
            None if t is None else TensorDescriptor.from_tensor(t, [1, 1]) for t in (a, w, out, aux, src))
        programs = tu.num_sms(a.device)

        def persistent_grid(meta):
            return (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

        _linear_tma_kernel[persistent_grid](
            a_desc, w_desc, bias, out_desc, aux_desc, src_desc, gate, index,
            m, n, k, num_rows, triton.next_power_of_2(m), stride_gate, W_KN=w_kn, **flags)
        return out, aux

    stride_wn, stride_wk = (w.stride(1), w.stride(0)) if w_kn else (w.stride(0), w.stride(1))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        a, w, bias, out, aux, src, gate, index, m, n, k, num_rows, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), stride_wn, stride_wk, out.stride(0), 0 if aux is None else aux.stride(0),
        0 if src is None else src.stride(0), stride_gate, **flags)
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
    out, f = _linear(act, fc2_weight, fc2_bias, _EPILOGUE_GATED, src=x, gate=gate, index=index)
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


@torch.library.custom_op("packdit::fused_mlp_gelu_dgrad", mutates_args=())
def _gelu_dgrad_op(df: Tensor, fc2_weight: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    """``(dpre, act)``: ``dpre = (df @ fc2_weight) * gelu_tanh'(pre)``, ``act = gelu_tanh(pre)``, the GELU gradient
    as the epilogue of the dgrad GEMM (df (N, D_out), fc2_weight (D_out, H), pre (N, H))."""
    return _linear(df.contiguous(), fc2_weight, None, _EPILOGUE_GELU_GRAD, w_kn=True, src=pre)


@_gelu_dgrad_op.register_fake
def _(df, fc2_weight, pre):
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
    dpre, act = _gelu_dgrad_op(df, fc2_weight, pre)
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
