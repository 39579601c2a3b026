"""ODE samplers for rectified flow on packed batches: Euler and Heun from t = 1 (noise) to t = 0 (data).

Every requested sample, image ``(C, H, W)`` or video ``(C, T, H, W)``, starts as noise and is packed
with the others into one token sequence; each step is one model call on that sequence (two for Heun).
Sample b follows its own schedule: the uniform grid ``u_k = 1 - k / steps`` shifted by b's token count
(:func:`packdit.diffusion.flow.shift_timesteps`), so the model gets per-sample t ``(B,)`` at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from packdit._validate import checks_enabled
from packdit.diffusion.flow import BASE_TOKENS, MAX_SHIFT, check_shift_settings, full_token_counts, shift_timesteps
from packdit.diffusion.packed import (
    Generators,
    ModelFn,
    check_int,
    check_labels,
    classifier_free_guidance,
    starting_noise,
)
from packdit.layout import PatchSize, normalize_patch_size
from packdit.patches import pack, unpack

__all__ = ["flow_schedule", "sample"]


def flow_schedule(
    num_tokens: Tensor, steps: int, *, shift: bool = True, base_tokens: int = BASE_TOKENS, max_shift: float = MAX_SHIFT
) -> Tensor:
    """``(B, steps + 1)`` float64 timesteps per sample, from exactly 1 down to exactly 0.

    Row b is ``shift_timesteps(u, num_tokens[b])`` for ``u = linspace(1, 0, steps + 1)`` (or u itself
    without ``shift``); the shift is increasing and keeps both endpoints, so every row is a valid
    decreasing schedule. ValueError for ``steps`` not an int >= 1, ``num_tokens`` not a ``(B,)`` tensor
    of counts >= 0 (the values are checked while :func:`packdit.checks` is on), or shift settings
    outside ``base_tokens > 0``, ``1 <= max_shift < inf``.
    """
    check_int(steps, "steps", minimum=1)
    check_shift_settings(base_tokens, max_shift)
    if not isinstance(num_tokens, torch.Tensor):
        raise ValueError(f"num_tokens: expected a (B,) tensor of token counts, got {type(num_tokens).__name__}")
    if num_tokens.dim() != 1 or num_tokens.dtype == torch.bool:
        raise ValueError(f"num_tokens: expected a (B,) tensor of token counts, got shape {tuple(num_tokens.shape)} "
                         f"and dtype {num_tokens.dtype}")
    if checks_enabled() and num_tokens.numel():
        bad = ~(num_tokens >= 0)  # also NaN
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"num_tokens: expected counts >= 0, got {num_tokens[b].item()} for sample {b}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=num_tokens.device)
    u = u.expand(num_tokens.shape[0], -1)
    if not shift:
        return u.clone()
    return shift_timesteps(u, num_tokens[:, None], base_tokens=base_tokens, max_shift=max_shift)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shapes: Sequence[Sequence[int]],
    *,
    patch_size: PatchSize,
    y: Tensor | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    null_label: int | None = None,
    generator: Generators = None,
    device: torch.device | str | None = None,
    method: str = "euler",
    shift: bool = True,
    base_tokens: int = BASE_TOKENS,
    max_shift: float = MAX_SHIFT,
    noise: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Integrate ``dx/dt = v(x, t)`` from noise at t = 1 to samples at t = 0: a list of tensors of ``shapes``.

    ``shapes``: per sample ``(C, H, W)`` or ``(C, T, H, W)``, divisible by ``patch_size``.
    ``noise``: the starting noise per sample (float32); else drawn with :func:`draw_noise` from
    ``generator`` (one, or one per sample), so the same seed gives bitwise the same samples.
    ``y``: ``(B,)`` labels for conditional models. ``cfg_scale != 1`` runs classifier-free guidance with
    the conditional and the ``null_label`` copies packed in one 2B-sample sequence and returns
    ``uncond + cfg_scale * (cond - uncond)``; ``cfg_scale == 1`` calls the conditional model only.

    With ``h_k = t_{k+1} - t_k < 0`` per sample (each token uses its sample's ``h_k``):

        euler: x_{k+1} = x_k + h_k * v(x_k, t_k)
        heun:  x'      = x_k + h_k * v(x_k, t_k)
               x_{k+1} = x_k + h_k * (v(x_k, t_k) + v(x', t_{k+1})) / 2

    Heun (2nd order, 2 calls per step) also corrects the last step, at t = 0, where a rectified-flow
    velocity is still defined.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method: expected 'euler' or 'heun', got {method!r}")
    patch_size = normalize_patch_size(patch_size)
    x, seqs = pack(starting_noise(shapes, noise, generator, device), patch_size)
    check_labels(y, len(seqs))
    velocity = model_fn
    if cfg_scale != 1.0:
        if null_label is None:
            raise ValueError("cfg_scale != 1 needs the null_label of the unconditional model")
        velocity = classifier_free_guidance(model_fn, cfg_scale=cfg_scale, null_label=null_label)

    schedule = flow_schedule(full_token_counts(seqs), steps, shift=shift, base_tokens=base_tokens,
                             max_shift=max_shift)                                # (B, steps + 1) float64
    step_sizes = (schedule[:, 1:] - schedule[:, :-1]).to(x.dtype)               # (B, steps)
    schedule = schedule.to(x.dtype)
    segment_ids = seqs.segment_ids.long()
    for k in range(steps):
        h = step_sizes[:, k][segment_ids, None]                                 # (N, 1)
        v = velocity(x, seqs, schedule[:, k], y).to(x.dtype)
        if method == "euler":
            x = x + h * v
        else:
            v_next = velocity(x + h * v, seqs, schedule[:, k + 1], y).to(x.dtype)
            x = x + h * (0.5 * (v + v_next))
    return unpack(x, seqs, patch_size)
