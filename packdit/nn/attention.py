"""Multi-head attention modules on packed tokens ``x (N, dim)`` + :class:`~packdit.PackedSeqs`.

``PackedAttention`` (self-attention)::

    q, k, v = split(qkv(x))                     (N, Hq*d), (N, Hk*d), (N, Hk*d), d = dim / num_heads
    q, k = rms_norm(q) * w_q, rms_norm(k) * w_k  per head over d (qk_norm=True), eps 1e-6
    out = proj(varlen_attention(q, k, v, mode, rope))

``PackedCrossAttention``: q from x, k/v from a packed context (e.g. per-sample text tokens) with its
own ``cu_seqlens``; sample b of x attends to segment b of the context.

The fused ``qkv`` / ``proj`` names and the [q heads | k heads | v heads] column order match the
official DiT (timm ``Attention``) state_dict. q, k, v are strided views of the projection output:
the kernels read them in place (only the head dim must be contiguous).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from packdit.layout import PackedSeqs
from packdit.nn import functional as PF
from packdit.rope import RoPE3D

__all__ = ["PackedAttention", "PackedCrossAttention"]

_QK_NORM_EPS = 1e-6


def _head_sizes(dim: int, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if dim % num_heads:
        raise ValueError(f"num_heads: dim {dim} is not divisible by {num_heads} heads")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: {num_heads} query heads are not divisible by {num_kv_heads} kv heads")
    return dim // num_heads, num_kv_heads


class _QKNorm(nn.Module):
    """RMSNorm over the head dim of ``(N, heads, d)`` with a learnable ``(d,)`` weight shared by the heads."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, eps=_QK_NORM_EPS)


class PackedAttention(nn.Module):
    """Self-attention over a packed batch; ``forward(x (N, dim), seqs) -> (N, dim)``.

    Args:
        dim: model width; ``num_heads`` query heads of ``dim / num_heads``; ``num_kv_heads`` (GQA/MQA,
            default ``num_heads``) key/value heads.
        qkv_bias: bias of the fused qkv Linear. qk_norm: per-head RMSNorm of q and k.
        rope: optional :class:`~packdit.RoPE3D` from ``seqs.positions``, fused into the kernel.
        mode: "full", "spatial" (own frame) or "temporal" (own (h, w) across frames).
        backend: "triton" (the kernel), "torch" (the reference) or None (chosen per call, see
            :mod:`packdit.nn.functional`).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, qkv_bias: bool = True,
                 qk_norm: bool = False, rope: RoPE3D | None = None, mode: str = "full", backend: str | None = None):
        super().__init__()
        self.backend = PF.check_backend(backend, "varlen_attention")
        self.head_dim, self.num_kv_heads = _head_sizes(dim, num_heads, num_kv_heads)
        if mode not in PF.ATTENTION_MODES:
            raise ValueError(f"mode: expected one of {PF.ATTENTION_MODES}, got {mode!r}")
        if rope is not None:
            rope.check_head_dim(self.head_dim)
        self.num_heads, self.rope, self.mode = num_heads, rope, mode
        self.qkv = nn.Linear(dim, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.q_norm = _QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = _QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, seqs: PackedSeqs, heads=None) -> Tensor:
        """x (N, dim) -> (N, dim). Sequence parallelism: with ``heads`` (a
        :class:`packdit.distributed.SequenceShard`), x holds the shard's tokens of ``seqs``; ``heads.to_heads``
        trades q, k, v for all tokens of the rank's heads before the attention, ``heads.to_tokens`` trades back."""
        d, hq, hk = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(x).split([hq * d, hk * d, hk * d], dim=-1)
        q = self.q_norm(q.unflatten(-1, (hq, d)))
        k = self.k_norm(k.unflatten(-1, (hk, d)))
        v = v.unflatten(-1, (hk, d))
        if heads is not None:
            q, k, v = heads.to_heads(q, k, v)
        out = PF.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode=self.mode, seqs=seqs,
                                  rope=self.rope, backend=self.backend)
        if heads is not None:
            out = heads.to_tokens(out)
        return self.proj(out.flatten(1))


class PackedCrossAttention(nn.Module):
    """Cross-attention of packed queries to a packed context; ``forward(x (N, dim), seqs, context (M, context_dim),
    context_cu_seqlens (B+1,), context_max_seqlen) -> (N, dim)``. Linears ``q``, ``kv`` (fused), ``proj``."""

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, num_kv_heads: int | None = None,
                 qkv_bias: bool = True, qk_norm: bool = False, backend: str | None = None):
        super().__init__()
        self.backend = PF.check_backend(backend, "varlen_attention")
        self.head_dim, self.num_kv_heads = _head_sizes(dim, num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.q_norm = _QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = _QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, seqs: PackedSeqs, context: Tensor, context_cu_seqlens: Tensor,
                context_max_seqlen: int) -> Tensor:
        d, hk = self.head_dim, self.num_kv_heads
        q = self.q_norm(self.q(x).unflatten(-1, (self.num_heads, d)))
        k, v = self.kv(context).unflatten(-1, (2 * hk, d)).split([hk, hk], dim=1)
        out = PF.varlen_attention(q, self.k_norm(k), v, seqs.cu_seqlens, seqs.max_seqlen, context_cu_seqlens,
                           context_max_seqlen, seqs=seqs, backend=self.backend)
        return self.proj(out.flatten(1))
