"""Per-sample pooling over packed tokens (NaViT section 3.1, "pooling representations").

``segment_pool(x (N, D), seqs, "mean") -> (B, D)``: the mean of each sample's tokens, computed with a
segmented reduction (``torch.segment_reduce``: no padding, no float atomics, so it is deterministic);
an empty sample pools to zeros. :class:`AttentionPool` is the multihead attention pooling (MAP) head:
a learned probe per sample attends over that sample's tokens only, via varlen cross-attention with one
query per sample (``cu_seqlens_q = [0, 1, ..., B]``) against the sample's tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from packdit._validate import validate_seqs
from packdit.layout import PackedSeqs
from packdit.nn import functional as PF

__all__ = ["segment_pool", "AttentionPool"]


def segment_pool(x: Tensor, seqs: PackedSeqs, mode: str = "mean") -> Tensor:
    """``x (N, D)`` -> ``(B, D)``: the mean (``mode="mean"``) or sum (``"sum"``) of each sample's tokens."""
    if mode not in ("mean", "sum"):
        raise ValueError(f"mode: expected 'mean' or 'sum', got {mode!r}")
    validate_seqs(seqs)
    if x.dim() != 2 or x.shape[0] != seqs.num_tokens:
        raise ValueError(f"x: expected ({seqs.num_tokens}, D) tokens of seqs, got {tuple(x.shape)}")
    lengths = seqs.lengths
    sums = torch.segment_reduce(x, "sum", lengths=lengths, axis=0)
    if mode == "sum":
        return sums
    return sums / lengths.clamp_min(1).unsqueeze(-1).to(sums.dtype)


class AttentionPool(nn.Module):
    """Multihead attention pooling: ``(N, dim)`` packed tokens -> ``(B, dim)``, one learned probe per sample.

    ``out_b = proj(softmax(probe k_b^T / sqrt(d)) v_b)`` with ``k, v = kv(x_b)``; tokens of other samples
    are never seen. Empty samples pool to ``proj(0)``.
    """

    def __init__(self, dim: int, num_heads: int, *, backend: str | None = None):
        super().__init__()
        self.backend = PF.check_backend(backend, "varlen_attention")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.randn(1, dim) * dim**-0.5)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, seqs: PackedSeqs) -> Tensor:
        validate_seqs(seqs)
        b, (n, dim) = len(seqs), x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        k, v = self.kv(x).view(n, 2, heads, head_dim).unbind(1)
        q = self.probe.expand(b, dim).reshape(b, heads, head_dim)
        cu_seqlens_q = torch.arange(b + 1, dtype=torch.int32, device=x.device)
        out = PF.varlen_attention(q, k, v, cu_seqlens_q, 1, seqs.cu_seqlens, seqs.max_seqlen, backend=self.backend)
        return self.proj(out.reshape(b, dim))
