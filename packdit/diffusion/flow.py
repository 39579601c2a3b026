"""Rectified flow / flow matching on packed batches (Liu et al. arXiv 2209.03003; Lipman et al. arXiv 2210.02747;
SD3, Esser et al. arXiv 2403.03206).

Convention, t in [0, 1] with t = 1 pure noise::

    x_t = (1 - t) * x0 + t * noise,        noise ~ N(0, I)
    v   = d x_t / d t = noise - x0         (the model's target: the velocity)

Sampling integrates ``dx/dt = v(x, t)`` from t = 1 (noise) down to t = 0 (:mod:`packdit.diffusion.samplers`).

Training timesteps are logit-normal (SD3 section 3.1): ``t = sigmoid(m + s * z)``, z ~ N(0, 1), which
puts more training on the middle of the path than uniform t. They are then shifted per sample by its
resolution (SD3 section 5.3.2): a sample with more tokens needs more noise to destroy the same amount
of signal, so with ``s_b = sqrt(L_b / base_tokens)`` (L_b the sample's full token count)::

    t' = s_b * t / (1 + (s_b - 1) * t)

which maps 0 -> 0 and 1 -> 1, is increasing in t, and is the identity at ``L_b = base_tokens``. It is
the SD3 rule: ``t' / (1 - t') = s_b * t / (1 - t)``, i.e. the noise-to-signal ratio is multiplied by
s_b (SD3 writes it with pixel counts m/n, which equal token ratios at a fixed patch size). s_b is
clamped to ``[1 / max_shift, max_shift]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor

from packdit._validate import validate_seqs
from packdit.diffusion.packed import (
    ModelFn,
    check_finite,
    check_int,
    check_labels,
    check_null_label,
    draw_noise,
    segment_mean,
)
from packdit.layout import DropRate, PackedSeqs, PatchSize
from packdit.patches import pack, pack_like

__all__ = [
    "BASE_TOKENS", "MAX_SHIFT", "FlowMatching", "sample_timesteps", "timestep_shift_factor", "shift_timesteps",
    "frame_timesteps", "full_token_counts",
]

BASE_TOKENS = 256
"""Token count at which the shift is 1: DiT-XL/2 at 256x256 (32x32 SD-VAE latent, 2x2 patches = 16x16 tokens)."""

MAX_SHIFT = 4.0
"""Clamp of the shift factor: 4 = sqrt(4096 / 256), a 1024x1024 image (4096 tokens) at the 256 base;
longer videos keep this shift instead of growing without bound (SD3 found 3.0 best at 1024^2)."""

Timesteps = Union[Tensor, Callable[[PackedSeqs], Tensor], None]


def sample_timesteps(
    num_samples: int, *, generator: torch.Generator | None = None, device=None, mean: float = 0.0, std: float = 1.0
) -> Tensor:
    """Logit-normal timesteps ``sigmoid(mean + std * z)``, z ~ N(0, 1): ``(num_samples,)`` float32 in (0, 1).

    z is drawn on the generator's device (CPU when None and no device) and moved to ``device``.
    """
    check_int(num_samples, "num_samples")
    mean, std = check_finite(mean, "mean"), check_finite(std, "std", minimum=0.0)
    draw_device = generator.device if generator is not None else device
    z = torch.randn(num_samples, generator=generator, device=draw_device)
    return torch.sigmoid(mean + std * z).to(device)


def check_shift_settings(base_tokens, max_shift) -> None:
    """ValueError unless ``base_tokens`` is finite and > 0 and ``max_shift`` finite and >= 1."""
    check_finite(base_tokens, "base_tokens", minimum=0.0, exclusive=True)
    check_finite(max_shift, "max_shift (the shift factor is clamped to [1 / max_shift, max_shift])", minimum=1.0)


def timestep_shift_factor(
    num_tokens: Tensor, *, base_tokens: int = BASE_TOKENS, max_shift: float = MAX_SHIFT
) -> Tensor:
    """``s = clamp(sqrt(num_tokens / base_tokens), 1 / max_shift, max_shift)``, float64, shape of ``num_tokens``.

    ``base_tokens`` must be finite and > 0, ``max_shift`` finite and >= 1 (below 1 the clamp range is
    empty; 0 divides by zero), else ValueError.
    """
    check_shift_settings(base_tokens, max_shift)
    ratio = num_tokens.to(torch.float64) / base_tokens
    return ratio.sqrt().clamp(1.0 / max_shift, max_shift)


def shift_timesteps(
    t: Tensor, num_tokens: Tensor, *, base_tokens: int = BASE_TOKENS, max_shift: float = MAX_SHIFT
) -> Tensor:
    """Resolution shift ``t' = s * t / (1 + (s - 1) * t)`` with ``s = timestep_shift_factor(num_tokens)``.

    ``t`` and ``num_tokens`` broadcast: ``(B,)`` and ``(B,)`` shift each sample by its own token count;
    ``(B, K)`` schedules take ``num_tokens[:, None]``. Computed in float64 so that t = 0 and t = 1 map
    exactly to 0 and 1, returned in ``t``'s dtype.
    """
    s = timestep_shift_factor(num_tokens, base_tokens=base_tokens, max_shift=max_shift)
    t64 = t.to(torch.float64)
    return (s * t64 / (1 + (s - 1) * t64)).to(t.dtype)


def full_token_counts(seqs: PackedSeqs) -> Tensor:
    """``(B,)`` int64 ``T*H*W`` of each sample's patch grid: its resolution, whether or not tokens were dropped."""
    validate_seqs(seqs)
    return seqs.grid.long().prod(dim=1)


def frame_timesteps(t_frames: Sequence[Tensor], seqs: PackedSeqs) -> Tensor:
    """Per-frame timesteps -> per-token timesteps ``(N,)`` (diffusion forcing, image-to-video).

    ``t_frames[b]`` is ``(T_b,)``, one t per patch frame of sample b (T_b = ``seqs.grid[b, 0]``; a clean
    conditioning frame has t = 0). Token i gets the t of its own frame ``positions[i, 0]``, so dropped
    layouts work too.
    """
    validate_seqs(seqs)
    frames = seqs.grid[:, 0].long()
    for b, (tf, n) in enumerate(zip(t_frames, frames.tolist())):
        if tf.shape != (n,):
            raise ValueError(f"t_frames[{b}]: expected ({n},), one t per patch frame, got {tuple(tf.shape)}")
    first_frame = torch.cumsum(frames, 0) - frames                              # (B,) offset into cat(t_frames)
    flat = torch.cat(list(t_frames)).to(seqs.device)
    return flat[first_frame[seqs.segment_ids.long()] + seqs.positions[:, 0].long()]


@dataclasses.dataclass(frozen=True)
class FlowMatching:
    """Rectified-flow training objective on packed batches.

    Attributes:
        logit_mean, logit_std: of the logit-normal timestep distribution (SD3's best: 0, 1).
        shift: apply the per-sample resolution shift to sampled timesteps.
        base_tokens, max_shift: of the shift (see the module docstring).
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: bool = True
    base_tokens: int = BASE_TOKENS
    max_shift: float = MAX_SHIFT

    def __post_init__(self):
        check_finite(self.logit_mean, "logit_mean")
        check_finite(self.logit_std, "logit_std", minimum=0.0)
        check_shift_settings(self.base_tokens, self.max_shift)

    def sample_timesteps(self, seqs: PackedSeqs, generator: torch.Generator | None = None) -> Tensor:
        """``(B,)`` logit-normal timesteps, each shifted by its sample's full token count when ``shift``."""
        t = sample_timesteps(len(seqs), generator=generator, device=seqs.device, mean=self.logit_mean,
                             std=self.logit_std)
        if self.shift:
            t = shift_timesteps(t, full_token_counts(seqs), base_tokens=self.base_tokens, max_shift=self.max_shift)
        return t

    def training_loss(
        self,
        model_fn: ModelFn,
        latents: Sequence[Tensor],
        *,
        patch_size: PatchSize,
        t: Timesteps = None,
        y: Tensor | None = None,
        noise: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        drop_rate: DropRate = None,
        cfg_dropout: float = 0.0,
        null_label: int | None = None,
    ) -> tuple[Tensor, dict]:
        """Velocity-matching loss of ``model_fn`` on the packed ``latents``: ``(loss, details)``.

        ``latents``: B tensors ``(C, T, H, W)`` / ``(C, H, W)`` of any sizes, packed with ``patch_size``
        (and token dropping at ``drop_rate``; the loss is then on kept tokens only).
        ``noise``: per-sample noise like ``latents``; drawn from ``generator`` when None (image-space
        per sample, then packed onto the kept tokens with :func:`pack_like`).
        ``t``: None (draw with :meth:`sample_timesteps`), ``(B,)`` per sample, ``(N,)`` per token (diffusion
        forcing / image-to-video, e.g. :func:`frame_timesteps`), or a callable ``seqs -> t`` for per-token t
        of a layout only known after dropping. The model gets ``t`` as given.
        ``cfg_dropout``: each sample's label is replaced by ``null_label`` with this probability
        (one ``torch.rand`` per sample from the generator).
        ``generator`` is used, in this order, for token dropping (needs a CPU generator), noise, timesteps
        and label dropout, so one seed reproduces the whole loss.

        The loss is normalised per sample::

            e_i    = mean_channels (model_fn(x_t)_i - (noise_i - x0_i))^2      per kept token i
            loss_b = mean_{i in b} e_i                                          per sample
            loss   = mean_b loss_b                                              (samples without tokens excluded)

        so every sample counts the same, whatever its token count: a long video does not outweigh an image.

        details: ``per_sample`` (B,) losses (detached), ``t``, ``y`` (labels after dropout), ``seqs``.
        """
        x0, seqs = pack(latents, patch_size, drop_rate=drop_rate, generator=generator)
        check_labels(y, len(seqs))
        if noise is None:
            noise = draw_noise([x.shape for x in latents], generator, device=x0.device, dtype=x0.dtype)
        noise = pack_like(noise, seqs, patch_size)

        if t is None:
            t = self.sample_timesteps(seqs, generator)
        elif callable(t):
            t = t(seqs)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t: expected a floating ({len(seqs)},) or ({seqs.num_tokens},) tensor of times in "
                             f"[0, 1], got {got}")
        t = t.to(x0.device)
        if t.shape == (len(seqs),):
            t_tokens = t[seqs.segment_ids.long()]
        elif t.shape == (seqs.num_tokens,):
            t_tokens = t
        else:
            raise ValueError(
                f"t: expected ({len(seqs)},) per sample or ({seqs.num_tokens},) per token, got {tuple(t.shape)}"
            )

        if check_finite(cfg_dropout, "cfg_dropout", minimum=0.0) > 1:
            raise ValueError(f"cfg_dropout: expected a probability in [0, 1], got {cfg_dropout!r}")
        if cfg_dropout > 0:
            if y is None or null_label is None:
                raise ValueError("cfg_dropout > 0 needs labels y and the null_label that replaces dropped ones")
            check_null_label(null_label, model_fn)
            draw_device = generator.device if generator is not None else y.device
            dropped = torch.rand(len(seqs), generator=generator, device=draw_device).to(y.device) < cfg_dropout
            y = torch.where(dropped, torch.full_like(y, null_label), y)

        t_col = t_tokens[:, None]
        x_t = ((1 - t_col) * x0 + t_col * noise).to(x0.dtype)
        prediction = model_fn(x_t, seqs, t, y)
        if prediction.shape != x0.shape:
            raise ValueError(
                f"model_fn: expected a velocity per token of shape {tuple(x0.shape)}, got {tuple(prediction.shape)}"
            )
        token_error = (prediction.float() - (noise - x0).float()).square().mean(dim=1)   # (N,)
        per_sample = segment_mean(token_error, seqs)                                      # (B,)
        has_tokens = (seqs.lengths > 0).to(per_sample.dtype)
        loss = (per_sample * has_tokens).sum() / has_tokens.sum().clamp_min(1)
        return loss, {"per_sample": per_sample.detach(), "t": t, "y": y, "seqs": seqs}
