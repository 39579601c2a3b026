"""Backend-dispatching functionals that packdit's models are written against.

Each function has a ``backend`` argument: ``"torch"`` runs the readable reference code in
:mod:`packdit.reference` (any device, the default without a GPU), ``"triton"`` runs packdit's fused
kernels (the default on a CUDA device with Triton; on the CPU they run under ``TRITON_INTERPRET=1``,
which is how the tests compare the two). ``None`` means :func:`default_backend`. A model stores one
backend name and passes it down, so it can be checked op by op against its own reference path.

Shapes: packed tokens ``x (N, D)``; modulation tables ``shift/scale/gate (R, D)`` with one row per
sample, frame or token and ``mod_index (N,)`` int32 the row of each token (``seqs.segment_ids`` for
per-sample conditioning).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from packdit import reference
from packdit.layout import PackedSeqs
from packdit.reference.rope import RoPE3D, apply_rope_3d

__all__ = ["BACKENDS", "default_backend", "resolve_backend", "attention", "qk_norm_rope", "norm_modulate",
           "gated_residual", "mlp"]

BACKENDS = ("torch", "triton")


def default_backend() -> str:
    """``"triton"`` when a CUDA device and Triton are present, else ``"torch"``."""
    return "triton" if torch.cuda.is_available() and importlib.util.find_spec("triton") else "torch"


def resolve_backend(backend: str | None) -> str:
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    return backend


def attention(
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
    backend: str | None = None,
) -> Tensor:
    """Varlen attention ``q (Nq, Hq, d)``, ``k, v (Nk, Hk, d)`` -> ``(Nq, Hq, d)`` inside each segment;
    ``mode`` "spatial"/"temporal" and ``rope`` read ``seqs`` (see :func:`packdit.varlen_attention`)."""
    if resolve_backend(backend) == "triton":
        from packdit.ops.attention import varlen_attention

        return varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, cu_seqlens_k, max_seqlen_k, scale=scale,
                                mode=mode, seqs=seqs, rope=rope)
    if rope is not None:
        q, k = apply_rope_3d(q, seqs.positions, rope), apply_rope_3d(k, seqs.positions, rope)
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, mode=mode,
                                      grid=None if mode == "full" else seqs.grid)


def qk_norm_rope(x: Tensor, weight: Tensor | None = None, positions: Tensor | None = None,
                 rope: RoPE3D | None = None, *, eps: float = 1e-6, backend: str | None = None) -> Tensor:
    """Per-head RMSNorm (``weight (H, D)`` given) then 3-D RoPE (``rope`` given) of ``x (N, H, D)``, once per
    layer (see :func:`packdit.ops.qk_norm_rope.qk_norm_rope`)."""
    if resolve_backend(backend) == "triton":
        from packdit.ops.qk_norm_rope import qk_norm_rope as kernel

        return kernel(x, weight, positions, rope, eps=eps)
    if weight is not None:
        x = (F.rms_norm(x, x.shape[-1:], eps=eps) * weight).to(x.dtype)
    return x if rope is None else apply_rope_3d(x, positions, rope)


def norm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, mod_index: Tensor, *, norm: str = "layer", eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """adaLN: ``norm(x) * (1 + scale[mod_index]) + shift[mod_index]`` (norm without affine weights)."""
    if resolve_backend(backend) == "triton":
        from packdit.ops.modulate import modulated_norm

        return modulated_norm(x, shift, scale, mod_index, eps=eps, norm_type=norm)
    return reference.modulated_norm_reference(x, shift, scale, mod_index, eps=eps, norm_type=norm)


def gated_residual(x: Tensor, f: Tensor, gate: Tensor, mod_index: Tensor, *, backend: str | None = None) -> Tensor:
    """adaLN-Zero residual: ``x + gate[mod_index] * f``."""
    if resolve_backend(backend) == "triton":
        from packdit.ops.gated_residual import gated_residual as kernel

        return kernel(x, f, gate, mod_index)
    return reference.gated_residual_reference(x, f, gate, mod_index)


def mlp(h: Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, *, residual: Tensor | None = None,
        gate: Tensor | None = None, mod_index: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``fc2(gelu_tanh(fc1(h)))``, or with ``residual``, ``gate``, ``mod_index`` the adaLN-Zero block tail
    ``residual + gate[mod_index] * fc2(gelu_tanh(fc1(h)))`` (fused into fc2's epilogue on triton)."""
    if resolve_backend(backend) == "triton":
        from packdit.ops.mlp import fused_mlp

        return fused_mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual, gate, mod_index)
    out = reference.mlp_reference(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    return out if residual is None else reference.gated_residual_reference(residual, out, gate, mod_index)
