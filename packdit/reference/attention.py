"""Reference varlen attention: one ``F.scaled_dot_product_attention`` call per packed segment.

Layout (the flash-attn varlen convention)::

    q: (Nq, Hq, D)    k, v: (Nk, Hk, D)    Hq % Hk == 0 (GQA: query head h reads kv head h // (Hq/Hk))
    cu_seqlens_q: (B+1,) int32 over q,  cu_seqlens_k: (B+1,) int32 over k/v (defaults to cu_seqlens_q)

For each sample b: ``out[q_b] = softmax(scale * q_b k_b^T) v_b``, with no token of b ever seeing a
token of another sample (``mode="full"``). Factorized spacetime attention reads each sample's
``(T, H, W)`` patch grid (``grid`` rows, tokens in (t, h, w) raster order, none dropped):

    mode="spatial"   token (t, h, w) attends to the H*W tokens (t, *, *) of its own frame
    mode="temporal"  token (t, h, w) attends to the T tokens (*, h, w) at its own spatial position

Segments with no keys give zero output (the flash-attn convention) and
``lse = -inf``. This is the oracle the Triton kernels are tested against: slow, one launch per
segment, obviously correct. It rejects every layout the kernel rejects (always, whatever
``packdit.checks`` says): ``cu_seqlens`` not a ``(B+1,)`` int32 tensor starting at 0, non-decreasing
and ending at N; q and k layouts with different segment counts; a grid that is not ``(B, 3)`` or does
not match the segment lengths; a non-finite ``scale``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["varlen_attention"]


def _host_offsets(cu_seqlens: Tensor, num_tokens: int, name: str) -> list[int]:
    """``cu_seqlens`` as a host list after checking it is a (B+1,) int32 prefix sum over ``num_tokens`` tokens."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"{name}: expected a (B+1,) int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name}: expected a (B+1,) int32 tensor, got {cu_seqlens.dtype} of shape "
                         f"{tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] = 0, got {offsets[0]}")
    for b in range(len(offsets) - 1):
        if offsets[b + 1] < offsets[b]:
            raise ValueError(f"{name}: expected non-decreasing offsets, got {name}[{b}] = {offsets[b]} > "
                             f"{name}[{b + 1}] = {offsets[b + 1]} (segment {b} would have negative length)")
    if offsets[-1] != num_tokens:
        raise ValueError(f"{name}: expected {name}[-1] = {num_tokens} (the number of tokens), got {offsets[-1]}")
    return offsets


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None = None,
    *,
    scale: float | None = None,
    mode: str = "full",
    grid: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention inside each packed segment; returns ``out (Nq, Hq, D)`` [and ``lse (Hq, Nq)`` fp32].

    ``mode`` "spatial" / "temporal" need ``grid`` ``(B, 3)`` and self-attention (no ``cu_seqlens_k``).
    """
    if mode not in ("full", "spatial", "temporal"):
        raise ValueError(f"mode: expected 'full', 'spatial' or 'temporal', got {mode!r}")
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v: expected (Nq, Hq, D), (Nk, Hk, D), (Nk, Hk, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    hq, hk = q.shape[1], k.shape[1]
    if hq % hk:
        raise ValueError(f"q, k: query heads {hq} must be a multiple of key/value heads {hk}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite softmax scale, got {scale}")
    cq = _host_offsets(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: self-attention needs as many key as query tokens, got {k.shape[0]} vs {q.shape[0]}")
    if mode != "full":
        if grid is None or cu_seqlens_k is not None:
            raise ValueError(f"mode={mode!r}: needs grid and self-attention (cu_seqlens_k=None)")
        return _factorized(q, k, v, cq, grid, mode, scale, return_lse)
    ck = cq if cu_seqlens_k is None else _host_offsets(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(ck) != len(cq):
        raise ValueError(f"cu_seqlens_k: expected {len(cq) - 1} segments like cu_seqlens_q, got {len(ck) - 1}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    out = q.new_zeros(q.shape)
    lse = q.new_full((hq, q.shape[0]), -math.inf, dtype=torch.float32)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qb = q[q0:q1].transpose(0, 1)                                   # (Hq, Lq, D)
        kb = k[k0:k1].transpose(0, 1).repeat_interleave(hq // hk, 0)    # (Hq, Lk, D)
        vb = v[k0:k1].transpose(0, 1).repeat_interleave(hq // hk, 0)
        # 4-D (1, Hq, L, D): SDPA may pick a fused backend (flash, memory-efficient) that never holds the
        # scores; 3-D input always runs the math backend: 32 GiB of fp32 scores for a 31k-token video at 9 heads
        out[q0:q1] = F.scaled_dot_product_attention(qb[None], kb[None], vb[None], scale=scale)[0].transpose(0, 1)
        if return_lse:
            lse[:, q0:q1] = torch.logsumexp((qb.float() @ kb.float().transpose(1, 2)) * scale, dim=-1)
    return (out, lse) if return_lse else out


def _factorized(q, k, v, cu, grid, mode, scale, return_lse):
    """Spatial / temporal attention: regroup each sample's (T*H*W) raster tokens into a batch of frames
    ``(T, H*W)`` or of spatial positions ``(H*W, T)`` and run one batched SDPA per sample; ``cu`` the
    checked host offsets."""
    hq, hk = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not isinstance(grid, Tensor) or grid.shape != (len(cu) - 1, 3) or grid.is_floating_point():
        got = f"{grid.dtype} of shape {tuple(grid.shape)}" if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"grid: expected a ({len(cu) - 1}, 3) integer tensor, one (T, H, W) per segment, got {got}")
    negative = (grid < 0).any(dim=1)
    if bool(negative.any()):
        b = int(negative.nonzero()[0, 0])
        raise ValueError(f"grid[{b}]: expected (T, H, W) >= 0, got {tuple(grid[b].tolist())}")
    out = q.new_zeros(q.shape)
    lse = q.new_full((hq, q.shape[0]), -math.inf, dtype=torch.float32)
    for b, (t, h, w) in enumerate(grid.tolist()):
        start, end = cu[b], cu[b + 1]
        if end - start != t * h * w:
            raise ValueError(f"grid[{b}]: {t}x{h}x{w} tokens expected in a layout without dropping, got {end - start}")
        if end == start:
            continue

        def groups(x):  # (T*H*W, heads, D) -> (groups, heads, group size, D)
            x = x[start:end].unflatten(0, (t, h * w))                    # (T, HW, heads, D)
            return x.permute(0, 2, 1, 3) if mode == "spatial" else x.permute(1, 2, 0, 3)

        qb = groups(q)
        kb = groups(k).repeat_interleave(hq // hk, 1)
        vb = groups(v).repeat_interleave(hq // hk, 1)
        ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        spatial = mode == "spatial"
        out[start:end] = (ob.permute(0, 2, 1, 3) if spatial else ob.permute(2, 0, 1, 3)).flatten(0, 1)
        if return_lse:
            lb = torch.logsumexp((qb.float() @ kb.float().transpose(-1, -2)) * scale, dim=-1)  # (groups, heads, size)
            lse[:, start:end] = (lb.permute(1, 0, 2) if spatial else lb.permute(1, 2, 0)).flatten(1)
    return (out, lse) if return_lse else out
