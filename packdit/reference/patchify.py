"""Pure-PyTorch oracle of patchify / unpatchify on packed ragged samples, written as an explicit
coordinate gather (independent of the reshape/permute path of :mod:`packdit.layout`).

Token n of sample b (tokens ``cu_seqlens[b]:cu_seqlens[b+1]``) is the patch at raster index r
(``raster_index[n]``, or ``n - cu_seqlens[b]``) of the sample's (T', H', W') grid, r = t*H'*W' + h*W' + w.
Its feature f = (c, it, ih, iw) in conv order, or (it, ih, iw, c) with ``channels_last``, holds latent
element ``(c, t*pt + it, h*ph + ih, w*pw + iw)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["patchify_reference", "unpatchify_reference"]


def _latent_coords(raster: Tensor, grid, patch_size, channels: int, channels_last: bool):
    """Latent coordinates (c, t, h, w), each (L, F), of the F features of L tokens at ``raster``."""
    _, gh, gw = grid
    pt, ph, pw = patch_size
    t, h, w = raster // (gh * gw), (raster // gw) % gh, raster % gw
    c, it, ih, iw = torch.meshgrid(*(torch.arange(s, device=raster.device) for s in (channels, pt, ph, pw)),
                                   indexing="ij")
    if channels_last:
        c, it, ih, iw = (v.permute(1, 2, 3, 0) for v in (c, it, ih, iw))
    c, it, ih, iw = (v.reshape(1, -1) for v in (c, it, ih, iw))
    return c, t[:, None] * pt + it, h[:, None] * ph + ih, w[:, None] * pw + iw


def _sample_rasters(cu_seqlens: Tensor, raster_index: Tensor | None, device) -> list[Tensor]:
    cu = cu_seqlens.tolist()
    return [torch.arange(cu[b + 1] - cu[b], device=device) if raster_index is None
            else raster_index[cu[b]:cu[b + 1]].to(device, torch.int64) for b in range(len(cu) - 1)]


def patchify_reference(latents: Sequence[Tensor], cu_seqlens: Tensor, raster_index: Tensor | None,
                       patch_size: Sequence[int], channels_last: bool = False) -> Tensor:
    """Samples (C, T, H, W) / (C, H, W) -> packed tokens (N, C*pt*ph*pw), features in conv order
    (C, pt, ph, pw) or (pt, ph, pw, C) with ``channels_last``."""
    pieces = []
    for x, raster in zip(latents, _sample_rasters(cu_seqlens, raster_index, latents[0].device)):
        x = x.unsqueeze(1) if x.dim() == 3 else x
        grid = tuple(s // p for s, p in zip(x.shape[1:], patch_size))
        pieces.append(x[_latent_coords(raster, grid, patch_size, x.shape[0], channels_last)])
    return torch.cat(pieces)


def unpatchify_reference(tokens: Tensor, cu_seqlens: Tensor, raster_index: Tensor | None,
                         grids: Sequence[Sequence[int]], sample_ndims: Sequence[int], patch_size: Sequence[int],
                         channels_last: bool = False, fill_value: float | None = None) -> list[Tensor]:
    """Packed tokens (N, F) -> samples (C, T'*pt, H'*ph, W'*pw), squeezed to (C, H, W) where
    ``sample_ndims[b] == 3``; positions without a token hold ``fill_value`` (0 when None)."""
    channels = tokens.shape[1] // (patch_size[0] * patch_size[1] * patch_size[2])
    out = []
    cu = cu_seqlens.tolist()
    for b, (raster, grid, ndim) in enumerate(zip(_sample_rasters(cu_seqlens, raster_index, tokens.device),
                                                 grids, sample_ndims)):
        shape = (channels, *(g * p for g, p in zip(grid, patch_size)))
        x = tokens.new_full(shape, 0.0 if fill_value is None else fill_value)
        x[_latent_coords(raster, grid, patch_size, channels, channels_last)] = tokens[cu[b]:cu[b + 1]]
        out.append(x.squeeze(1) if ndim == 3 else x)
    return out
