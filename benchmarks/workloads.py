"""Sample streams the benchmarks share: latent shapes of images and videos as a video DiT sees them.

Latents follow the common video-VAE geometry (8x spatial, 4x causal temporal compression,
``T_lat = 1 + (frames - 1) // 4``) with C = 4 channels; the DiT then patchifies with (1, 2, 2).
Mixes (seeded, reproducible):

- ``images``: images only, 256-1024 px, aspect ratios 1:1, 4:3, 3:4, 16:9, 9:16.
- ``video-mix``: 40% images as above, 60% videos at 144p-720p with 17-129 frames, the spread that
  makes per-sample cost vary by ~3 orders of magnitude.
- ``long-videos``: 480p/720p videos with 65-257 frames.
"""

from __future__ import annotations

import random

MIXES = ("images", "video-mix", "long-videos")
LATENT_CHANNELS = 4
_ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
_VIDEO_HEIGHTS = (144, 240, 360, 480, 720)


def _hw(rng: random.Random, short_side: int) -> tuple[int, int]:
    a, b = rng.choice(_ASPECTS)
    h, w = (short_side, short_side * b // a) if a <= b else (short_side * a // b, short_side)
    # latent = pixels / 8, rounded down to a multiple of the 2x2 patch
    return max(2, h // 16 * 2), max(2, w // 16 * 2)


def _image(rng: random.Random) -> tuple[int, ...]:
    h, w = _hw(rng, rng.choice((256, 384, 512, 768, 1024)))
    return (LATENT_CHANNELS, h, w)


def _video(rng: random.Random, heights, frames) -> tuple[int, ...]:
    h, w = _hw(rng, rng.choice(heights))
    return (LATENT_CHANNELS, 1 + (rng.choice(frames) - 1) // 4, h, w)


def latent_shapes(mix: str, num_samples: int, *, seed: int = 0) -> list[tuple[int, ...]]:
    """``num_samples`` latent shapes ``(C, H, W)`` / ``(C, T, H, W)`` drawn from ``mix``."""
    rng = random.Random(f"{mix}-{seed}")
    if mix == "images":
        return [_image(rng) for _ in range(num_samples)]
    if mix == "video-mix":
        return [_image(rng) if rng.random() < 0.4 else _video(rng, _VIDEO_HEIGHTS, (17, 33, 49, 65, 97, 129))
                for _ in range(num_samples)]
    if mix == "long-videos":
        return [_video(rng, (480, 720), (65, 129, 193, 257)) for _ in range(num_samples)]
    raise ValueError(f"mix: expected one of {MIXES}, got {mix!r}")


def num_patches(shape: tuple[int, ...], patch_size=(1, 2, 2)) -> int:
    t = shape[1] if len(shape) == 4 else 1
    return (t // patch_size[0]) * (shape[-2] // patch_size[1]) * (shape[-1] // patch_size[2])


def take_tokens(mix: str, token_budget: int, *, seed: int = 0, patch_size=(1, 2, 2)) -> list[tuple[int, ...]]:
    """Samples from ``mix`` in stream order until ``token_budget`` patches are reached (at least one)."""
    shapes, total, chunk = [], 0, 0
    while True:
        for shape in latent_shapes(mix, 64, seed=seed * 1000 + chunk):
            n = num_patches(shape, patch_size)
            if shapes and total + n > token_budget:
                return shapes
            shapes.append(shape)
            total += n
        chunk += 1
