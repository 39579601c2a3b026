"""Backend-dispatching functionals that packdit's modules and models are written against.

Each function has a ``backend`` argument: ``"torch"`` runs the readable reference code (any device,
the CPU default), ``"triton"`` runs packdit's fused kernels (the default on a CUDA device with Triton).
``None`` means :func:`default_backend`. Modules store a backend name and pass it down, so one model can
be compared op by op against its own reference path.

Shapes: packed tokens ``x (N, D)``; modulation tables ``shift/scale/gate (R, D)`` with one row per
sample (or per frame / token) and ``mod_index (N,)`` the row of each token (``seqs.segment_ids`` for
per-sample conditioning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from packdit import reference

__all__ = ["BACKENDS", "default_backend", "resolve_backend", "attention", "norm_modulate", "gated_residual", "mlp"]

BACKENDS = ("torch",)


def default_backend() -> str:
    """The fastest backend available on this machine."""
    return "torch"


def resolve_backend(backend: str | None) -> str:
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
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
    backend: str | None = None,
) -> Tensor:
    """Varlen attention ``q (Nq, Hq, d)``, ``k, v (Nk, Hk, d)`` -> ``(Nq, Hq, d)``, inside each segment."""
    resolve_backend(backend)
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale)


def _layer_norm(x: Tensor, norm: str, eps: float) -> Tensor:
    if norm == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    if norm == "rms":
        return F.rms_norm(x, x.shape[-1:], eps=eps)
    raise ValueError(f"norm: expected 'layer' or 'rms', got {norm!r}")


def norm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, mod_index: Tensor, *, norm: str = "layer", eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """adaLN: ``norm(x) * (1 + scale[mod_index]) + shift[mod_index]`` (norm without affine weights)."""
    resolve_backend(backend)
    idx = mod_index.long()
    return _layer_norm(x, norm, eps) * (1 + scale[idx]) + shift[idx]


def gated_residual(x: Tensor, f: Tensor, gate: Tensor, mod_index: Tensor, *, backend: str | None = None) -> Tensor:
    """adaLN-Zero residual: ``x + gate[mod_index] * f``."""
    resolve_backend(backend)
    return x + gate[mod_index.long()] * f


def mlp(h: Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, *, backend: str | None = None) -> Tensor:
    """``fc2(gelu_tanh(fc1(h)))``."""
    resolve_backend(backend)
    return fc2(F.gelu(fc1(h), approximate="tanh"))
