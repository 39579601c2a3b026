"""``patchify`` / ``unpatchify``: samples of any size <-> packed tokens, one kernel launch for the batch.

Sample b, a latent ``(C, T, H, W)`` (or image ``(C, H, W)``, T = 1), owns tokens
``cu_seqlens[b]:cu_seqlens[b+1]`` of the packed ``(N, F)`` buffer, F = C*pt*ph*pw. Token n of sample b
is the patch at raster index r of its (T', H', W') = (T/pt, H/ph, W/pw) grid, r = ``raster_index[n]``
for kept-token (dropped) layouts, else ``n - cu_seqlens[b]``; its feature vector is ordered
(C, pt, ph, pw) (the Conv3d weight flattening), or (pt, ph, pw, C) with ``channels_last`` (the
official DiT output order).

Implementations:

Kernel: ``csrc/cuda/patchify.cu`` (CUDA tensors, ``packdit._C`` built with CUDA), one launch over the
N*F elements of the packed buffer, driven by an int64 descriptor table (B, 9) on the device (each
sample's data pointer, element strides, grid, first token; see ``csrc/include/packdit/patchify.h``),
so the latents stay separate tensors of any strides and nothing is padded or concatenated first.
It is a pure copy of raw element bits, so it is bit-exact to its oracle
:func:`packdit.reference.patchify_reference`. Anywhere else the ops raise after checking their
arguments; :func:`packdit.nn.functional.patchify` (and so :func:`packdit.pack`, :func:`packdit.pack_like`,
:func:`packdit.unpack`) choose between this kernel and the reference per call.

Both ops are ``torch.library`` custom ops with fake implementations and autograd (each is the other's
backward; dropped positions get zero gradient).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from packdit import _ext
from packdit._backends import cuda_ext_unsupported
from packdit.layout import check_latents

__all__ = ["patchify", "unpatchify"]


def _require_kernel(t: Tensor) -> None:
    reason = cuda_ext_unsupported(t.device)
    if reason:
        raise ValueError(f"packdit.ops.patchify: the CUDA kernel is not supported because {reason}; "
                         "packdit.pack / packdit.unpack choose the PyTorch reference automatically")


# ---------------------------------------------------------------------- checks
def _check_patch_size(patch_size: list[int]) -> tuple[int, int, int]:
    if len(patch_size) != 3 or any(int(p) <= 0 for p in patch_size):
        raise ValueError(f"patch_size: expected 3 positive ints (pt, ph, pw), got {list(patch_size)}")
    return tuple(int(p) for p in patch_size)


def _check_layout(cu_seqlens: Tensor, segment_ids: Tensor, raster_index: Optional[Tensor], num_samples: int,
                  device: torch.device) -> None:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.shape != (num_samples + 1,):
        raise ValueError(f"cu_seqlens: expected an int32 tensor of shape ({num_samples + 1},) (one entry per "
                         f"sample + 1), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if segment_ids.dtype != torch.int32 or segment_ids.dim() != 1:
        raise ValueError(f"segment_ids: expected a 1-D int32 tensor, got {segment_ids.dtype} "
                         f"{tuple(segment_ids.shape)}")
    if raster_index is not None and (raster_index.dtype != torch.int64 or raster_index.shape != segment_ids.shape):
        raise ValueError(f"raster_index: expected an int64 tensor of shape {tuple(segment_ids.shape)} like "
                         f"segment_ids, got {raster_index.dtype} {tuple(raster_index.shape)}")
    for name, t in (("cu_seqlens", cu_seqlens), ("segment_ids", segment_ids), ("raster_index", raster_index)):
        if t is not None and (t.device != device or not t.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous tensor on {device}, got {t.device}")


def _full_offsets(grids) -> list[int]:
    offsets = [0]
    for t, h, w in grids:
        offsets.append(offsets[-1] + t * h * w)
    return offsets


# ---------------------------------------------------------------------- CUDA launch
def _launch(samples: list[Tensor], grids, tokens: Tensor, segment_ids: Tensor, raster_index: Optional[Tensor],
            patch_size, channels_last: bool, to_tokens: bool) -> None:
    """Build the (B, 9) descriptor table and run the gather (``to_tokens``) or scatter kernel."""
    offsets = _full_offsets(grids)
    desc = []
    for b, (x, grid) in enumerate(zip(samples, grids)):
        strides = x.stride() if x.dim() == 4 else (x.stride(0), 0, *x.stride()[1:])
        desc.append([x.data_ptr(), *strides, *grid, offsets[b]])
    desc = torch.tensor(desc, dtype=torch.int64).to(tokens.device, non_blocking=True)
    ext = _ext.load()
    fn = ext.patchify_cuda if to_tokens else ext.unpatchify_cuda
    with torch.cuda.device(tokens.device):
        fn(desc.data_ptr(), segment_ids.data_ptr(), 0 if raster_index is None else raster_index.data_ptr(),
           tokens.shape[0], samples[0].shape[0], *patch_size, tokens.element_size(), channels_last,
           tokens.data_ptr(), torch.cuda.current_stream(tokens.device).cuda_stream)


# ---------------------------------------------------------------------- patchify
@torch.library.custom_op("packdit::patchify", mutates_args=())
def patchify(latents: list[Tensor], cu_seqlens: Tensor, segment_ids: Tensor, raster_index: Optional[Tensor],
             patch_size: list[int], channels_last: bool) -> Tensor:
    """Samples -> packed tokens ``(N, C*pt*ph*pw)``, N = ``segment_ids.shape[0]``; see the module docstring.

    ``channels_last`` orders each token (pt, ph, pw, C). ``segment_ids`` (N,) int32 and ``cu_seqlens`` (B+1,)
    int32 come from the layout (:class:`packdit.PackedSeqs`); ``raster_index`` (N,) int64
    (``seqs.raster_index()``) is required when tokens were dropped and must be None otherwise.
    """
    patch = _check_patch_size(patch_size)
    grids = check_latents(latents, patch)
    _check_layout(cu_seqlens, segment_ids, raster_index, len(latents), latents[0].device)
    num_tokens = segment_ids.shape[0]
    if raster_index is None and num_tokens != _full_offsets(grids)[-1]:
        raise ValueError(f"segment_ids: {num_tokens} tokens, but the latents have {_full_offsets(grids)[-1]} "
                         "patches; pass raster_index for a layout with dropped tokens")
    _require_kernel(latents[0])
    features = latents[0].shape[0] * patch[0] * patch[1] * patch[2]
    tokens = latents[0].new_empty(num_tokens, features)
    if tokens.numel():
        _launch(latents, grids, tokens, segment_ids, raster_index, patch, channels_last, to_tokens=True)
    return tokens


@patchify.register_fake
def _(latents, cu_seqlens, segment_ids, raster_index, patch_size, channels_last):
    patch = _check_patch_size(patch_size)
    check_latents(latents, patch)
    return latents[0].new_empty(segment_ids.shape[0], latents[0].shape[0] * patch[0] * patch[1] * patch[2])


def _patchify_setup(ctx, inputs, output):
    latents, cu_seqlens, segment_ids, raster_index, patch_size, channels_last = inputs
    patch = _check_patch_size(patch_size)
    ctx.channels_last = channels_last
    ctx.grids = [g for grid in check_latents(latents, patch) for g in grid]
    ctx.sample_ndims = [x.dim() for x in latents]
    ctx.patch_size = list(patch)
    ctx.save_for_backward(cu_seqlens, segment_ids, raster_index)


def _patchify_backward(ctx, grad_tokens):
    cu_seqlens, segment_ids, raster_index = ctx.saved_tensors
    grads = unpatchify(grad_tokens.contiguous(), cu_seqlens, segment_ids, raster_index, ctx.grids,
                       ctx.sample_ndims, ctx.patch_size, ctx.channels_last, 0.0)
    return list(grads), None, None, None, None, None


patchify.register_autograd(_patchify_backward, setup_context=_patchify_setup)


# ---------------------------------------------------------------------- unpatchify
def _sample_shapes(channels: int, grids: list[int], sample_ndims: list[int], patch) -> list[tuple[int, ...]]:
    shapes = []
    for b, ndim in enumerate(sample_ndims):
        t, h, w = (g * p for g, p in zip(grids[3 * b:3 * b + 3], patch))
        shapes.append((channels, h, w) if ndim == 3 else (channels, t, h, w))
    return shapes


def _check_unpatchify(tokens, cu_seqlens, segment_ids, raster_index, grids, sample_ndims, patch_size):
    patch = _check_patch_size(patch_size)
    if len(grids) != 3 * len(sample_ndims) or any(g < 0 for g in grids):
        raise ValueError(f"grids: expected 3 non-negative ints per sample ({3 * len(sample_ndims)}), got {len(grids)}")
    if any(d not in (3, 4) for d in sample_ndims):
        raise ValueError(f"sample_ndims: expected 3 (image) or 4 (video) per sample, got {list(sample_ndims)}")
    features = patch[0] * patch[1] * patch[2]
    if tokens.dim() != 2 or tokens.shape[1] % features or tokens.shape[0] != segment_ids.shape[0]:
        raise ValueError(f"tokens: expected shape ({segment_ids.shape[0]}, C*{features}), got {tuple(tokens.shape)}")
    _check_layout(cu_seqlens, segment_ids, raster_index, len(sample_ndims), tokens.device)
    return patch, tokens.shape[1] // features


@torch.library.custom_op("packdit::unpatchify", mutates_args=())
def unpatchify(tokens: Tensor, cu_seqlens: Tensor, segment_ids: Tensor, raster_index: Optional[Tensor],
               grids: list[int], sample_ndims: list[int], patch_size: list[int], channels_last: bool,
               fill_value: Optional[float]) -> list[Tensor]:
    """Packed tokens (N, F) -> one latent per sample: ``(C, T'*pt, H'*ph, W'*pw)``, or ``(C, H, W)`` where
    ``sample_ndims[b] == 3``. ``grids`` is the flat list of each sample's (T', H', W'). With
    ``raster_index`` (dropped tokens) the outputs are full-size, ``fill_value`` where no token landed."""
    patch, channels = _check_unpatchify(tokens, cu_seqlens, segment_ids, raster_index, grids, sample_ndims,
                                        patch_size)
    grid_triples = [tuple(grids[3 * b:3 * b + 3]) for b in range(len(sample_ndims))]
    _require_kernel(tokens)
    shapes = _sample_shapes(channels, grids, sample_ndims, patch)
    if raster_index is None:
        samples = [tokens.new_empty(s) for s in shapes]
    else:
        samples = [tokens.new_full(s, 0.0 if fill_value is None else fill_value) for s in shapes]
    if tokens.numel():
        tokens = tokens.contiguous()
        _launch(samples, grid_triples, tokens, segment_ids, raster_index, patch, channels_last, to_tokens=False)
    return samples


@unpatchify.register_fake
def _(tokens, cu_seqlens, segment_ids, raster_index, grids, sample_ndims, patch_size, channels_last, fill_value):
    patch, channels = _check_unpatchify(tokens, cu_seqlens, segment_ids, raster_index, grids, sample_ndims,
                                        patch_size)
    return [tokens.new_empty(s) for s in _sample_shapes(channels, grids, sample_ndims, patch)]


def _unpatchify_setup(ctx, inputs, output):
    _, cu_seqlens, segment_ids, raster_index, _, _, patch_size, channels_last, _ = inputs
    ctx.patch_size, ctx.channels_last = list(patch_size), channels_last
    ctx.save_for_backward(cu_seqlens, segment_ids, raster_index)
    ctx.sample_like = [(x.shape, x.dtype, x.device) for x in output]


def _unpatchify_backward(ctx, grads):
    cu_seqlens, segment_ids, raster_index = ctx.saved_tensors
    grads = [torch.zeros(s, dtype=d, device=dev) if g is None else g
             for g, (s, d, dev) in zip(grads, ctx.sample_like)]
    grad_tokens = patchify(grads, cu_seqlens, segment_ids, raster_index, ctx.patch_size, ctx.channels_last)
    return grad_tokens, None, None, None, None, None, None, None, None


unpatchify.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)
