"""The dispatcher: every packdit op, choosing per call between its kernel and its PyTorch reference.

Each function has the name and the arguments of its kernel in :mod:`packdit.ops` plus a keyword
``backend``; the ``nn`` modules, the models and :func:`packdit.pack` / :func:`packdit.unpack` call these,
never ``packdit.ops`` or ``packdit.reference`` directly. This is the only runtime module that imports
:mod:`packdit.reference`.

    op                      kernel (backend)                       reference (packdit.reference)
    varlen_attention        ops.attention (``"triton"``)           varlen_attention + apply_rope_3d
    qk_norm_rope            ops.qk_norm_rope (``"triton"``)        qk_norm_rope_reference
    modulated_norm          ops.modulate (``"triton"``)            modulated_norm_reference
    gated_residual          ops.gated_residual (``"triton"``)      gated_residual_reference
    fused_mlp               ops.mlp (``"triton"``)                 mlp_reference
    patchify, unpatchify    ops.patchify (``"cuda"``, packdit._C)  patchify_reference, unpatchify_reference

The contract, the same for every op:

* ``backend=None`` (automatic): on CUDA tensors, where a kernel is expected, the kernel when it can run with
  what is installed (:mod:`packdit._backends`), else the reference with one warning per process and reason
  (triton not installed, packdit._C built without CUDA; a missing extension is reported once by its loader,
  :mod:`packdit._ext`). On CPU tensors the reference, without a warning: it is the designed CPU path, not a
  fallback. ``TRITON_INTERPRET=1`` does not change the automatic choice; the interpreter is opted into.
* ``backend="triton"`` / ``"cuda"`` (the op's kernel): runs it, or raises :class:`BackendUnavailableError`
  saying why it is not supported (e.g. CPU tensors without ``TRITON_INTERPRET=1``); this is how the tests
  run the Triton kernels on the CPU.
* ``backend="torch"``: the reference, on any device.

The choice is made per call, so a model built on a GPU machine and called with CPU tensors runs every op
on the reference. Outputs have the kernels' dtype (x's, or h's for the MLP) whichever backend ran.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from packdit import reference
from packdit._backends import EXT_MISSING, cuda_ext_unsupported, triton_unsupported
from packdit.layout import PackedSeqs
from packdit.ops.attention_schedule import MODES as ATTENTION_MODES
from packdit.reference.rope import apply_rope_3d
from packdit.rope import RoPE3D

__all__ = ["ATTENTION_MODES", "BackendUnavailableError", "check_backend", "use_kernel", "varlen_attention",
           "qk_norm_rope", "modulated_norm", "gated_residual", "fused_mlp", "patchify", "unpatchify"]

_KERNEL_BACKEND = {"varlen_attention": "triton", "qk_norm_rope": "triton", "modulated_norm": "triton",
                   "gated_residual": "triton", "fused_mlp": "triton", "patchify": "cuda", "unpatchify": "cuda"}
_UNSUPPORTED = {"triton": triton_unsupported, "cuda": cuda_ext_unsupported}
_warned: set[tuple[str, str]] = set()


class BackendUnavailableError(ValueError):
    """An explicitly requested kernel backend cannot run here; the message says why."""


def check_backend(backend: str | None, op: str) -> str | None:
    """``backend`` if ``op`` has it (its kernel's, ``"torch"``, or None: automatic), else ``ValueError``; for
    modules, which check the name they are given when they are built."""
    allowed = (_KERNEL_BACKEND[op], "torch")
    if backend is not None and backend not in allowed:
        raise ValueError(f"backend: {op} runs on {allowed[0]!r} or 'torch' (None: automatic), got {backend!r}")
    return backend


def use_kernel(op: str, device: torch.device, backend: str | None) -> bool:
    """Whether ``op`` runs its kernel on ``device`` tensors for ``backend`` (see the module docstring); one
    warning per process and reason for an automatic fallback on CUDA tensors."""
    if check_backend(backend, op) == "torch":
        return False
    kernel = _KERNEL_BACKEND[op]
    if backend is None and device.type != "cuda":
        return False  # the reference is the designed path off CUDA devices (the interpreter is opt-in)
    reason = _UNSUPPORTED[kernel](device)
    if reason is None:
        return True
    if backend is not None:
        raise BackendUnavailableError(f"{op}: backend={kernel!r} is not supported because {reason}")
    if (kernel, reason) not in _warned and reason != EXT_MISSING:  # packdit._ext reports that one itself
        _warned.add((kernel, reason))
        warnings.warn(f"packdit: {kernel} kernels are not supported because {reason}; running the PyTorch "
                      "reference ops on CUDA tensors instead", RuntimeWarning, stacklevel=3)
    return False


def _autocast(device: torch.device, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` in ``torch.autocast``'s dtype where it is on for ``device`` (``None`` kept), else unchanged.

    What ``F.linear`` does to its operands under autocast, done before a fused GEMM that takes one dtype: mixed
    precision keeps fp32 parameters (``fc1.weight``) beside bf16 activations, and a kernel given both would
    refuse them. Both backends get the cast inputs, so they return the same dtype."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t if t is None else t.to(dtype) for t in tensors)


# ---------------------------------------------------------------------- attention
def varlen_attention(
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
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention inside each packed segment: ``q (Nq, Hq, D)``, ``k, v (Nk, Hk, D)`` -> ``(Nq, Hq, D)``
    [and ``lse (Hq, Nq)``]; ``mode`` "spatial"/"temporal" and ``rope`` read ``seqs``. Arguments as
    :func:`packdit.ops.attention.varlen_attention`."""
    if use_kernel("varlen_attention", q.device, backend):
        from packdit.ops.attention import varlen_attention as kernel

        return kernel(q, k, v, cu_seqlens_q, max_seqlen_q, cu_seqlens_k, max_seqlen_k, scale=scale, mode=mode,
                      seqs=seqs, rope=rope, return_lse=return_lse)
    if (mode != "full" or rope is not None) and seqs is None:
        raise ValueError(f"seqs: mode={mode!r}{' and rope' if rope is not None else ''} need the PackedSeqs "
                         "layout (grid and positions)")
    if rope is not None:
        q, k = apply_rope_3d(q, seqs.positions, rope), apply_rope_3d(k, seqs.positions, rope)
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, mode=mode,
                                      grid=None if mode == "full" else seqs.grid, return_lse=return_lse)


def qk_norm_rope(x: Tensor, weight: Tensor | None = None, positions: Tensor | None = None,
                 rope: RoPE3D | None = None, *, eps: float = 1e-6, backend: str | None = None) -> Tensor:
    """Per-head RMSNorm (``weight (H, D)`` given) then 3-D RoPE (``rope`` and ``positions (N, 3)`` given) of
    ``x (N, H, D)``, once per layer before the attention. See :mod:`packdit.ops.qk_norm_rope`."""
    if use_kernel("qk_norm_rope", x.device, backend):
        from packdit.ops.qk_norm_rope import qk_norm_rope as kernel

        return kernel(x, weight, positions, rope, eps=eps)
    return reference.qk_norm_rope_reference(x, weight, positions, rope, eps)


# ---------------------------------------------------------------------- adaLN
def modulated_norm(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    index: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm_type: str = "layer",
    *,
    backend: str | None = None,
) -> Tensor:
    """``norm(x) * (1 + scale[index]) + shift[index]``: x (N, D), shift/scale (R, D), index (N,) int32,
    norm ``"layer"`` or ``"rms"`` with optional affine weight/bias (D,). See :mod:`packdit.ops.modulate`."""
    if use_kernel("modulated_norm", x.device, backend):
        from packdit.ops.modulate import modulated_norm as kernel

        return kernel(x, shift, scale, index, weight, bias, eps, norm_type)
    return reference.modulated_norm_reference(x, shift, scale, index, weight, bias, eps, norm_type).to(x.dtype)


def gated_residual(x: Tensor, f: Tensor, gate: Tensor, index: Tensor, *, backend: str | None = None) -> Tensor:
    """adaLN-Zero residual ``x + gate[index] * f``: x, f (N, D), gate (R, D), index (N,) int32."""
    if use_kernel("gated_residual", x.device, backend):
        from packdit.ops.gated_residual import gated_residual as kernel

        return kernel(x, f, gate, index)
    return reference.gated_residual_reference(x, f, gate, index).to(x.dtype)


def fused_mlp(
    h: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    x: Tensor | None = None,
    gate: Tensor | None = None,
    index: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``fc2(gelu_tanh(fc1(h)))``, or with x, gate, index the block tail ``x + gate[index] * fc2(...)``
    (fused into fc2's epilogue by the kernel). See :mod:`packdit.ops.mlp`."""
    h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x = _autocast(h.device, h, fc1_weight, fc1_bias, fc2_weight,
                                                                 fc2_bias, x)
    if use_kernel("fused_mlp", h.device, backend):
        from packdit.ops.mlp import fused_mlp as kernel

        return kernel(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index)
    return reference.mlp_reference(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, gate, index).to(h.dtype)


# ---------------------------------------------------------------------- patchify
def patchify(latents: Sequence[Tensor], cu_seqlens: Tensor, segment_ids: Tensor, raster_index: Tensor | None,
             patch_size: Sequence[int], channels_last: bool = False, *, backend: str | None = None) -> Tensor:
    """Samples (C, T, H, W) / (C, H, W) -> packed tokens (N, C*pt*ph*pw); ``raster_index`` (N,) int64 for a
    layout with dropped tokens. See :mod:`packdit.ops.patchify`."""
    if use_kernel("patchify", latents[0].device, backend):
        from packdit.ops.patchify import patchify as kernel

        return kernel(list(latents), cu_seqlens, segment_ids, raster_index, list(patch_size), channels_last)
    return reference.patchify_reference(latents, cu_seqlens, raster_index, patch_size, channels_last)


def unpatchify(tokens: Tensor, cu_seqlens: Tensor, segment_ids: Tensor, raster_index: Tensor | None,
               grids: Sequence[int], sample_ndims: Sequence[int], patch_size: Sequence[int],
               channels_last: bool = False, fill_value: float | None = None, *,
               backend: str | None = None) -> list[Tensor]:
    """Packed tokens (N, F) -> one latent per sample; ``grids`` is the flat list of each sample's (T', H', W').
    See :mod:`packdit.ops.patchify`."""
    if use_kernel("unpatchify", tokens.device, backend):
        from packdit.ops.patchify import unpatchify as kernel

        return kernel(tokens, cu_seqlens, segment_ids, raster_index, list(grids), list(sample_ndims),
                      list(patch_size), channels_last, fill_value)
    grid_triples = [tuple(grids[3 * b:3 * b + 3]) for b in range(len(sample_ndims))]
    return reference.unpatchify_reference(tokens, cu_seqlens, raster_index, grid_triples, sample_ndims, patch_size,
                                          channels_last, fill_value)
