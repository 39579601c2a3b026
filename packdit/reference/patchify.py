"""Pure-PyTorch patchify / unpatchify of packed ragged samples: the oracle of the CUDA ragged gather
(:mod:`packdit.ops.patchify`) and the implementation :func:`packdit.pack` / :func:`packdit.unpack` run
wherever that kernel does not (CPU tensors, no extension).

Token n of sample b (tokens ``cu_seqlens[b]:cu_seqlens[b+1]``) is the patch at raster index r
(``raster_index[n]`` for a layout with dropped tokens, else ``n - cu_seqlens[b]``) of the sample's
(T', H', W') = (T/pt, H/ph, W/pw) grid, r = t*H'*W' + h*W' + w. Its feature vector holds latent elements
``(c, t*pt + it, h*ph + ih, w*pw + iw)`` in conv order (c, it, ih, iw) -- the flattening of a
``Conv3d``/``Conv2d`` weight, so a Linear on the tokens with ``conv.weight.flatten(1)`` is the strided conv --
or in (it, ih, iw, c) with ``channels_last`` (the official DiT output order). Both directions are one
reshape + permute of each sample (a view) and, for dropped layouts, one row gather / scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["patchify_reference", "unpatchify_reference"]

# (C, T', pt, H', ph, W', pw) axes -> token axes (T', H', W') then feature axes
_TO_TOKENS = {False: (1, 3, 5, 0, 2, 4, 6), True: (1, 3, 5, 2, 4, 6, 0)}
# token-major (T', H', W', *features) axes -> (C, T', pt, H', ph, W', pw); features (C, pt, ph, pw) or (pt, ph, pw, C)
_TO_SAMPLE = {False: (3, 0, 4, 1, 5, 2, 6), True: (6, 0, 3, 1, 4, 2, 5)}


def _sample_rows(cu_seqlens: Tensor, raster_index: Tensor | None) -> list[Tensor | None]:
    """Per sample, the raster indices of its tokens (None: all of them, in order)."""
    if raster_index is None:
        return [None] * (cu_seqlens.shape[0] - 1)
    cu = cu_seqlens.tolist()
    return [raster_index[cu[b]:cu[b + 1]] for b in range(len(cu) - 1)]


def patchify_reference(latents: Sequence[Tensor], cu_seqlens: Tensor, raster_index: Tensor | None,
                       patch_size: Sequence[int], channels_last: bool = False) -> Tensor:
    """Samples (C, T, H, W) / (C, H, W) -> packed tokens (N, C*pt*ph*pw); ``raster_index`` (N,) selects the kept
    tokens of a dropped layout (None: every patch)."""
    pt, ph, pw = patch_size
    pieces = []
    for x, rows in zip(latents, _sample_rows(cu_seqlens, raster_index)):
        x = x.unsqueeze(1) if x.dim() == 3 else x
        c, t, h, w = x.shape
        patches = x.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw).permute(_TO_TOKENS[channels_last])
        patches = patches.reshape((t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)
        pieces.append(patches if rows is None else patches[rows.to(x.device, torch.int64)])
    return torch.cat(pieces)


def unpatchify_reference(tokens: Tensor, cu_seqlens: Tensor, raster_index: Tensor | None,
                         grids: Sequence[Sequence[int]], sample_ndims: Sequence[int], patch_size: Sequence[int],
                         channels_last: bool = False, fill_value: float | None = None) -> list[Tensor]:
    """Packed tokens (N, F) -> samples (C, T'*pt, H'*ph, W'*pw), squeezed to (C, H, W) where
    ``sample_ndims[b] == 3``; with ``raster_index`` the samples are full size and positions without a token
    hold ``fill_value`` (0 when None)."""
    pt, ph, pw = patch_size
    channels = tokens.shape[1] // (pt * ph * pw)
    if raster_index is None:
        pieces = tokens.split([t * h * w for t, h, w in grids])
    else:
        cu = cu_seqlens.tolist()
        pieces = [tokens[cu[b]:cu[b + 1]] for b in range(len(grids))]
    out = []
    for x, rows, (t, h, w), ndim in zip(pieces, _sample_rows(cu_seqlens, raster_index), grids, sample_ndims):
        if rows is not None:
            full = x.new_full((t * h * w, x.shape[1]), 0.0 if fill_value is None else fill_value)
            x = full.index_copy(0, rows.to(x.device, torch.int64), x)
        features = (pt, ph, pw, channels) if channels_last else (channels, pt, ph, pw)
        x = x.reshape(t, h, w, *features).permute(_TO_SAMPLE[channels_last])
        x = x.reshape(channels, t * pt, h * ph, w * pw)
        out.append(x.squeeze(1) if ndim == 3 else x)
    return out
