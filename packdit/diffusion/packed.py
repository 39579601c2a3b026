"""The packed model-function protocol and the pieces flow matching and DDPM share.

A *model function* maps a packed batch to one prediction per token::

    model_fn(x_tokens (N, D_in), seqs: PackedSeqs, t, y) -> (N, D_out)

``x_tokens`` come from :func:`packdit.pack` (each token a ``(C, pt, ph, pw)`` patch), ``t`` is ``(B,)``
(one timestep per sample) or ``(N,)`` (one per token, where the objective allows it), ``y`` is ``(B,)``
labels or None. The output tokens are in the same order and the same ``(C_out, pt, ph, pw)`` patch
layout, so ``unpack(out, seqs, patch_size)`` gives per-sample tensors. The model owns the order of its
output; :func:`dit_adapter` converts the reference DiT's ``(p, p, C_out)`` tokens. A model function may
carry a ``num_labels`` attribute, the size of its label table (:func:`dit_adapter` sets it), against which
a ``null_label`` is checked when guidance or label dropout is set up.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor

from packdit._validate import validate_seqs
from packdit.layout import PackedSeqs, normalize_patch_size
from packdit.nn.pool import segment_pool

__all__ = ["ModelFn", "Generators", "dit_adapter", "classifier_free_guidance", "draw_noise", "starting_noise",
           "segment_mean"]

ModelFn = Callable[[Tensor, PackedSeqs, Tensor, Union[Tensor, None]], Tensor]
"""``(x_tokens (N, D_in), seqs, t (B,) or (N,), y (B,) or None) -> (N, D_out)`` in pack order."""

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""One generator for the whole batch, one per sample, or None for the global RNG."""


def check_finite(value, name: str, *, minimum: float = -math.inf, exclusive: bool = False) -> float:
    """``value`` as a float, or ValueError naming ``name`` unless it is a finite real number above ``minimum``
    (``>=``, or ``>`` with ``exclusive``): a NaN scale would otherwise turn every output into NaN."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (exclusive and value == minimum):
        bound = "" if minimum == -math.inf else f" {'>' if exclusive else '>='} {minimum:g}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")
    return float(value)


def check_int(value, name: str, *, minimum: int = 0) -> int:
    """``value`` as an int, or ValueError naming ``name`` unless it is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_null_label(null_label, model_fn: ModelFn) -> None:
    """ValueError unless ``null_label`` is an int >= 0 inside ``model_fn.num_labels`` (when it declares one)."""
    num_labels = getattr(model_fn, "num_labels", None)
    if (isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral) or null_label < 0
            or (num_labels is not None and null_label >= num_labels)):
        table = "" if num_labels is None else f" < {num_labels} (the model's label table)"
        raise ValueError(f"null_label: expected an int >= 0{table}, got {null_label!r}")


def dit_adapter(model: torch.nn.Module, *, time_scale: float = 1000.0, keep_variance: bool = False,
                forward: Callable | None = None) -> ModelFn:
    """Wrap a DiT's ``forward_packed`` (:class:`packdit.DiT` or :class:`packdit.reference.DiT`) as a model
    function in pack order.

    The DiT emits each token as a channels-last ``(pt, ph, pw, C_out)`` patch; the adapter returns
    ``(C', pt, ph, pw)`` patches, the :func:`packdit.pack` order, with ``C' = in_channels`` (the noise /
    velocity channels: with ``learn_sigma`` the variance channels are dropped) or ``C' = C_out`` when
    ``keep_variance`` (the learned-range DDPM path, eps channels first). Timesteps are multiplied by
    ``time_scale`` before the sinusoidal embedding: 1000 maps flow time t in [0, 1] onto the 0..999 range
    the DiT embedding was designed for; use 1 for DDPM integer steps. ``t`` is passed on as given: the
    reference DiT takes one timestep per sample, :class:`packdit.DiT` also per frame or per token.

    The DiT drops labels itself in training mode (``class_dropout_prob``, global RNG). When label
    dropout is done by the objective (``cfg_dropout``), set ``model.y_embedder.dropout_prob = 0.0`` after
    construction: the embedding table keeps its null-class row.

    ``forward`` replaces ``model.forward_packed`` (same signature), e.g. a DDP/FSDP wrapper whose
    ``forward`` calls it, so the wrapper's gradient hooks see the call.
    """
    time_scale = check_finite(time_scale, "time_scale", minimum=0.0, exclusive=True)
    forward = model.forward_packed if forward is None else forward
    patch, c_out = normalize_patch_size(model.patch_size), model.out_channels
    kept_channels = c_out if keep_variance else model.in_channels

    def model_fn(x_tokens: Tensor, seqs: PackedSeqs, t: Tensor, y: Tensor | None) -> Tensor:
        out = forward(x_tokens, seqs, t * time_scale, y)                         # (N, pt*ph*pw*C_out)
        out = out.unflatten(1, (*patch, c_out))[..., :kept_channels]
        return out.permute(0, 4, 1, 2, 3).reshape(out.shape[0], kept_channels * math.prod(patch))

    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    model_fn.num_labels = table.num_embeddings if isinstance(table, torch.nn.Embedding) else None
    return model_fn


def _doubled_layout(seqs: PackedSeqs) -> PackedSeqs:
    """The layout of ``[samples..., samples...]``: every sample of ``seqs`` twice, in the same order."""
    kept = list(seqs.raster_index().split(list(seqs.seqlens))) * 2 if seqs.dropped else None
    return PackedSeqs.from_grids(seqs.grids * 2, kept=kept, sample_ndims=seqs.sample_ndims * 2, device=seqs.device)


def classifier_free_guidance(
    model_fn: ModelFn, *, cfg_scale: float, null_label: int, guided_columns: int | None = None
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) with both halves in ONE packed sequence.

    The wrapped function runs ``model_fn`` once on 2B samples, the conditional copies (labels ``y``) then
    the unconditional ones (labels ``null_label``), tokens ``cat([x, x])``, timesteps ``cat([t, t])``
    (works for per-sample and per-token t), and returns for the B samples::

        out[:, :k] = uncond + cfg_scale * (cond - uncond)        k = guided_columns (default: all)
        out[:, k:] = cond                                         (e.g. learned variance channels)

    In pack order the first ``c * pt*ph*pw`` columns of a token are its first c channels, so
    ``guided_columns = 3 * pt*ph*pw`` reproduces the official DiT ``forward_with_cfg`` (3 channels).
    The doubled layout is memoized on ``seqs``. A non-finite ``cfg_scale``, a ``null_label`` outside the
    model's label table or a negative ``guided_columns`` raise ValueError here; more guided columns than
    the output has raise at the call.
    """
    cfg_scale = check_finite(cfg_scale, "cfg_scale")
    check_null_label(null_label, model_fn)
    if guided_columns is not None:
        check_int(guided_columns, "guided_columns")

    def guided(x_tokens: Tensor, seqs: PackedSeqs, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("y: classifier-free guidance needs class labels")
        validate_seqs(seqs)  # the doubled layout is built from it
        doubled = seqs.cached("cfg_doubled", lambda: _doubled_layout(seqs))
        y_both = torch.cat([y, torch.full_like(y, null_label)])
        out = model_fn(torch.cat([x_tokens, x_tokens]), doubled, torch.cat([t, t]), y_both)
        cond, uncond = out.split(x_tokens.shape[0])
        k = out.shape[1] if guided_columns is None else guided_columns
        if k > out.shape[1]:
            raise ValueError(f"guided_columns: expected at most the {out.shape[1]} output columns, got {k}")
        mixed = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([mixed, cond[:, k:]], dim=1)

    guided.num_labels = getattr(model_fn, "num_labels", None)
    return guided


def draw_noise(
    shapes: Sequence[Sequence[int]], generator: Generators = None, *, device=None, dtype=torch.float32
) -> list[Tensor]:
    """One standard-normal tensor per requested shape, drawn in sample order.

    Each tensor is drawn in float32 on the generator's device, then moved to ``device``/``dtype``, so the
    values depend only on the generator state, not on the target device, dtype or packing. With one
    generator per sample (a sequence), sample b's noise depends on its own generator only, so a sample is
    reproducible whatever else is in its batch.
    """
    if isinstance(generator, Sequence):
        if len(generator) != len(shapes):
            raise ValueError(f"generator: expected one generator per sample ({len(shapes)}), got {len(generator)}")
        generators = list(generator)
    else:
        generators = [generator] * len(shapes)
    noise = []
    for shape, g in zip(shapes, generators):
        draw_device = g.device if g is not None else device
        noise.append(torch.randn(tuple(shape), generator=g, device=draw_device).to(device=device, dtype=dtype))
    return noise


def starting_noise(shapes: Sequence[Sequence[int]], noise: Sequence[Tensor] | None, generator: Generators,
                   device) -> list[Tensor]:
    """Where sampling starts: ``noise`` on ``device`` after checking it has ``shapes``, else :func:`draw_noise`."""
    if noise is None:
        return draw_noise(shapes, generator, device=device)
    noise = [n.to(device) for n in noise]
    if [tuple(n.shape) for n in noise] != [tuple(s) for s in shapes]:
        raise ValueError(f"noise: expected shapes {[tuple(s) for s in shapes]}, got {[tuple(n.shape) for n in noise]}")
    return noise


def check_labels(y: Tensor | None, num_samples: int) -> None:
    """ValueError unless ``y`` is None or a ``(num_samples,)`` tensor (one label per sample)."""
    if y is not None and (not isinstance(y, Tensor) or y.shape != (num_samples,)):
        got = f"shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y: expected ({num_samples},) labels, one per sample, got {got}")


def segment_mean(values: Tensor, seqs: PackedSeqs) -> Tensor:
    """Per-token values ``(N,)`` -> ``(B,)`` mean over each sample's tokens (0 for a sample without tokens);
    :func:`packdit.nn.segment_pool`: no loop over samples, deterministic on GPUs."""
    return segment_pool(values[:, None], seqs, "mean")[:, 0]
