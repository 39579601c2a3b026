"""Latents of any size <-> one packed buffer of patch tokens: :func:`pack`, :func:`pack_like`, :func:`unpack`.

Sample b, a latent ``(C, T_b, H_b, W_b)`` (video) or ``(C, H_b, W_b)`` (image, T=1), becomes
``L_b = (T_b/pt)*(H_b/ph)*(W_b/pw)`` tokens in (t, h, w) raster order, one after another::

    tokens: (N, C*pt*ph*pw)        N = sum_b L_b

The vector of one patch is ordered (C, pt, ph, pw), the flattening of a ``Conv3d``/``Conv2d`` weight
``(out, C, pt, ph, pw)``, so ``tokens @ conv.weight.flatten(1).T + conv.bias`` equals the strided conv
patch embedding. The layout comes back as a :class:`~packdit.PackedSeqs`.

Token dropping (NaViT section 3.1): ``pack(..., drop_rate=r)`` keeps a random subset of each sample's
patches, still in raster order, and ``positions`` hold the *true* (t, h, w) of the kept tokens, so
position embeddings and RoPE are unchanged by the drop.

The copies run through the dispatcher (:func:`packdit.nn.functional.patchify` / ``unpatchify``): the CUDA
ragged gather of ``packdit._C`` on CUDA tensors, the PyTorch reference (one reshape + permute per sample)
elsewhere. Both are bit-exact copies.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from packdit._validate import validate_seqs
from packdit.layout import MAX_TOKENS, DropRate, PackedSeqs, PatchSize, check_latents, normalize_patch_size
from packdit.nn import functional as PF

__all__ = ["pack", "pack_like", "unpack"]


def _drop_rate_of(drop_rate: DropRate, grid: tuple[int, int, int]) -> float:
    """The drop rate of a sample with patch grid ``grid``: ``drop_rate`` or, when callable, ``drop_rate(grid)``;
    ValueError unless it is a real number in [0, 1] (a string or None is not read as one)."""
    rate = drop_rate(grid) if callable(drop_rate) else drop_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
        source = f"drop_rate({grid})" if callable(drop_rate) else "drop_rate"
        raise ValueError(f"{source}: expected a number in [0, 1], got {rate!r}")
    return float(rate)


def _drop_keep(grid, rate: float, generator) -> Tensor | None:
    n = grid[0] * grid[1] * grid[2]
    keep = n - int(rate * n)
    if keep == n:
        return None
    return torch.randperm(n, generator=generator)[:keep].sort().values


def _raster_index(seqs: PackedSeqs) -> Tensor | None:
    return seqs.raster_index() if seqs.dropped else None


def pack(
    latents: Sequence[Tensor],
    patch_size: PatchSize = (1, 2, 2),
    *,
    drop_rate: DropRate = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, PackedSeqs]:
    """Patchify and concatenate ``latents`` into ``(tokens (N, C*pt*ph*pw), PackedSeqs)``.

    ``drop_rate``: fraction of each sample's patches to drop (NaViT token dropping), a float or a
    callable ``grid (T, H, W) -> float`` for resolution-dependent rates; sample b keeps
    ``L_b - floor(rate * L_b)`` patches chosen with ``generator`` (CPU), in raster order.
    """
    patch_size = normalize_patch_size(patch_size)
    grids = check_latents(latents, patch_size)
    num_tokens = sum(t * h * w for t, h, w in grids)
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"latents: {num_tokens} patches in total; int32 indexing allows at most {MAX_TOKENS}")
    kept = None
    if drop_rate is not None:
        kept = [_drop_keep(g, _drop_rate_of(drop_rate, g), generator) for g in grids]
    seqs = PackedSeqs.from_grids(
        grids, kept=kept, sample_ndims=[x.dim() for x in latents], device=latents[0].device
    )
    return PF.patchify(latents, seqs.cu_seqlens, seqs.segment_ids, _raster_index(seqs), patch_size), seqs


def pack_like(latents: Sequence[Tensor], seqs: PackedSeqs, patch_size: PatchSize = (1, 2, 2)) -> Tensor:
    """Pack ``latents`` (e.g. targets or noise) into exactly the layout ``seqs``, keeping the same dropped tokens.

    The loss on kept tokens of a dropped layout is ``mse(pred_tokens, pack_like(targets, seqs, p))``.
    """
    patch_size = normalize_patch_size(patch_size)
    validate_seqs(seqs)
    grids = check_latents(latents, patch_size)
    if len(grids) != len(seqs) or tuple(grids) != seqs.grids:
        for b, (g, want) in enumerate(zip(grids, seqs.grids)):
            if g != want:
                raise ValueError(f"latents[{b}]: patch grid {g} does not match the layout's grid {want}")
        raise ValueError(f"latents: expected {len(seqs)} samples like the layout, got {len(grids)}")
    return PF.patchify(latents, seqs.cu_seqlens, seqs.segment_ids, _raster_index(seqs), patch_size)


def unpack(
    tokens: Tensor,
    seqs: PackedSeqs,
    patch_size: PatchSize = (1, 2, 2),
    *,
    channels_last: bool = False,
    fill_value: float | None = None,
) -> list[Tensor]:
    """Inverse of :func:`pack`: ``tokens (N, C*pt*ph*pw)`` -> list of ``(C, T, H, W)`` / ``(C, H, W)``.

    ``channels_last=True`` reads each token as ``(pt, ph, pw, C)``, the order of the official DiT
    final layer (``unpatchify``'s ``nhwpqc``), instead of the conv order ``(C, pt, ph, pw)``.
    A layout with dropped tokens cannot be inverted: pass ``fill_value`` to scatter the kept tokens
    into full-size outputs filled with it (to look at predictions), or compare on kept tokens with
    :func:`pack_like`.
    """
    patch_size = normalize_patch_size(patch_size)
    validate_seqs(seqs)
    pt, ph, pw = patch_size
    if tokens.dim() != 2 or tokens.shape[0] != seqs.num_tokens:
        raise ValueError(f"tokens: expected shape ({seqs.num_tokens}, C*{pt}*{ph}*{pw}), got {tuple(tokens.shape)}")
    if tokens.shape[1] % (pt * ph * pw):
        raise ValueError(f"tokens: feature size {tokens.shape[1]} is not a multiple of pt*ph*pw = {pt * ph * pw}")
    if seqs.dropped and fill_value is None:
        raise ValueError(
            "seqs: the layout has dropped tokens, so unpack cannot restore the full samples; pass fill_value= "
            "to scatter kept tokens into full-size outputs, or use pack_like() to compare on kept tokens"
        )
    sample_ndims = seqs.sample_ndims or (4,) * len(seqs)
    return PF.unpatchify(tokens, seqs.cu_seqlens, seqs.segment_ids, _raster_index(seqs),
                         [g for grid in seqs.grids for g in grid], sample_ndims, patch_size, channels_last,
                         fill_value)
