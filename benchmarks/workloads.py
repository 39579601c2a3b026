"""Sample streams the benchmarks share: latent shapes of images and videos as a video DiT sees them.

Pixels -> latents by the common causal video VAE (8x space, 4x time: ``T_lat = 1 + (frames - 1) // 4``,
C = 4 channels); the DiT then patchifies with (1, 2, 2). Resolutions name the short side (144p..720p),
the long side follows the aspect ratio, both snapped to multiples of 16 px.

Default mix (``video-mix``): 30% images / 70% videos.
    video short side 144/240/360/480/720 p with probability .10/.20/.30/.25/.15
    image short side 144/240/360/480/720 p with probability .05/.10/.20/.30/.35
    aspect ratio 16:9 .55, 4:3 .12, 1:1 .10, 3:4 .05, 9:16 .15, 21:9 .03
    frames uniform over {17, 33, ..., 129}
Stress mixes: ``image-heavy`` (70% images), ``long-videos`` (10% images; videos 480p/720p only,
65..129 frames), and ``images`` (images only, the short-sequence case for attention).
Long-sample mix ``video-1080p``: the default mix with 1080p videos and long clips, for sequence
parallelism: 30% images as above; video short side 144/240/360/480/720/1080 p with probability
.10/.20/.28/.22/.16/.04; frames uniform over {17, 33, ..., 129} for 92% of the videos and over
{145, 161, 177, 193, 201} for 8%. Its longest samples, 1080p x 201 frames, are 51 x 68 x 120 = 416,160
patches (1080 px snaps to 1088); 21:9 ones 548k. About 2.4% of its samples (22% of its tokens) are longer
than 131,072 tokens.
All streams are seeded and reproducible.

Shape buckets (:func:`bucket_shape`), for the baselines that batch by shape: Open-Sora's bucket table
(``opensora/datasets/bucket.py`` and ``aspect.py`` of hpcaitech/Open-Sora v1.2) configured for this mix.
A bucket is (resolution, frames, aspect ratio):

* resolution: the largest of the five resolutions (pixel area ``short * 16/9 short``: 144p .. 720p)
  whose area is at most the sample's area / 0.8; smaller samples go to 144p (Open-Sora drops them), and
  the 1080p samples of ``video-1080p`` to 720p;
* frames: the longest of 1 (images), 17, 33, 65, 129 frames not longer than the clip (Open-Sora's
  doubling ladder; it also drops clips shorter than the shortest bucket, which this mix has none of);
* aspect ratio h/w: the closest of Open-Sora's 15 ratios 0.39 .. 2.10; the bucket's size is
  ``(sqrt(area * r), sqrt(area / r))`` snapped to 16 px.

The sample is resized to cover the bucket and center-cropped ("resize_crop"), and its clip cut to the
bucket's frames. Open-Sora's keep-probabilities (which move some samples down a resolution at random)
are all 1 here, which changes the fewest samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

MIXES = ("images", "image-heavy", "video-mix", "long-videos", "video-1080p")
LATENT_CHANNELS = 4
RESOLUTIONS = (144, 240, 360, 480, 720)
_VIDEO_RES_P = (0.10, 0.20, 0.30, 0.25, 0.15)
_IMAGE_RES_P = (0.05, 0.10, 0.20, 0.30, 0.35)
_ASPECTS = ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16), (21, 9))  # width : height
_ASPECT_P = (0.55, 0.12, 0.10, 0.05, 0.15, 0.03)
_FRAMES = tuple(range(17, 130, 16))

_HD_RESOLUTIONS = (*RESOLUTIONS, 1080)
_HD_VIDEO_RES_P = (0.10, 0.20, 0.28, 0.22, 0.16, 0.04)
_LONG_FRAMES = (145, 161, 177, 193, 201)


@dataclasses.dataclass(frozen=True)
class _MixSpec:
    image_fraction: float
    video_res_p: tuple[float, ...]
    frames: tuple[int, ...]
    video_resolutions: tuple[int, ...] = RESOLUTIONS
    long_clip_p: float = 0.0  # the fraction of videos with frames from long_frames instead
    long_frames: tuple[int, ...] = ()


_MIX_SPECS = {
    "images": _MixSpec(1.0, _VIDEO_RES_P, _FRAMES),
    "image-heavy": _MixSpec(0.7, _VIDEO_RES_P, _FRAMES),
    "video-mix": _MixSpec(0.3, _VIDEO_RES_P, _FRAMES),
    "long-videos": _MixSpec(0.1, (0.0, 0.0, 0.0, 0.5, 0.5), tuple(f for f in _FRAMES if f >= 65)),
    "video-1080p": _MixSpec(0.3, _HD_VIDEO_RES_P, _FRAMES, _HD_RESOLUTIONS, 0.08, _LONG_FRAMES),
}


BUCKET_FRAMES = (17, 33, 65, 129)
BUCKET_ASPECTS = (0.39, 0.42, 0.48, 0.50, 0.52, 0.56, 0.66, 0.75, 1.00, 1.33, 1.52, 1.78, 1.92, 2.00, 2.10)  # h / w
_AREA_TOLERANCE = 0.8  # Open-Sora's find_approximate_hw: a sample fits a resolution with >= 80% of its area


def _snap16(px: float) -> int:
    return max(16, int(round(px / 16)) * 16)


def _latent_hw(rng: random.Random, res_p, resolutions=RESOLUTIONS) -> tuple[int, int]:
    """(H, W) of a latent: short side from ``resolutions`` with probabilities ``res_p``, aspect from the default
    distribution, / 8."""
    short = rng.choices(resolutions, weights=res_p)[0]
    aw, ah = rng.choices(_ASPECTS, weights=_ASPECT_P)[0]
    h, w = (short, short * aw / ah) if aw >= ah else (short * ah / aw, short)
    return _snap16(h) // 8, _snap16(w) // 8


def latent_shapes(mix: str, num_samples: int, *, seed: int = 0) -> list[tuple[int, ...]]:
    """``num_samples`` latent shapes ``(C, H, W)`` (images) / ``(C, T, H, W)`` (videos) drawn from ``mix``."""
    if mix not in _MIX_SPECS:
        raise ValueError(f"mix: expected one of {MIXES}, got {mix!r}")
    spec = _MIX_SPECS[mix]
    rng = random.Random(f"{mix}-{seed}")
    shapes = []
    for _ in range(num_samples):
        if rng.random() < spec.image_fraction:
            shapes.append((LATENT_CHANNELS, *_latent_hw(rng, _IMAGE_RES_P)))
        else:
            h, w = _latent_hw(rng, spec.video_res_p, spec.video_resolutions)
            long_clip = spec.long_clip_p > 0 and rng.random() < spec.long_clip_p
            frames = rng.choice(spec.long_frames if long_clip else spec.frames)
            shapes.append((LATENT_CHANNELS, 1 + (frames - 1) // 4, h, w))
    return shapes


def _bucket_areas() -> tuple[int, ...]:
    """Pixel area of each bucket resolution, largest first (16:9 at the mix's short sides)."""
    return tuple(sorted((short * _snap16(short * 16 / 9) for short in RESOLUTIONS), reverse=True))


@functools.cache
def bucket_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The latent shape a sample of latent ``shape`` is trained at under the bucket table (module docstring):
    ``(C, H, W)`` stays an image, ``(C, T, H, W)`` a video of the bucket's frames."""
    c, *thw = shape
    h_px, w_px = 8 * thw[-2], 8 * thw[-1]
    area = next((a for a in _bucket_areas() if h_px * w_px >= _AREA_TOLERANCE * a), _bucket_areas()[-1])
    ratio = min(BUCKET_ASPECTS, key=lambda r: abs(r - h_px / w_px))
    h, w = _snap16(math.sqrt(area * ratio)) // 8, _snap16(math.sqrt(area / ratio)) // 8
    if len(thw) == 2:
        return (c, h, w)
    frames = 1 + 4 * (thw[0] - 1)
    bucket_frames = max((f for f in BUCKET_FRAMES if f <= frames), default=BUCKET_FRAMES[0])
    return (c, 1 + (bucket_frames - 1) // 4, h, w)


def patch_grid(shape: tuple[int, ...], patch_size=(1, 2, 2)) -> tuple[int, int, int]:
    """The (T', H', W') patch grid of a latent (C, T, H, W) or image latent (C, H, W) (T = 1)."""
    t = shape[1] if len(shape) == 4 else 1
    return t // patch_size[0], shape[-2] // patch_size[1], shape[-1] // patch_size[2]


def num_patches(shape: tuple[int, ...], patch_size=(1, 2, 2)) -> int:
    return math.prod(patch_grid(shape, patch_size))


def sample_lengths(mix: str, num_samples: int, *, seed: int = 0, patch_size=(1, 2, 2)) -> list[int]:
    """Token counts of ``num_samples`` samples of ``mix`` (what the packing planner sees)."""
    return [num_patches(s, patch_size) for s in latent_shapes(mix, num_samples, seed=seed)]


def take_tokens(mix: str, token_budget: int, *, seed: int = 0, patch_size=(1, 2, 2),
                max_skipped: int = 256) -> list[tuple[int, ...]]:
    """One pack of ``mix``: samples in stream order, each taken if it fits in what is left of ``token_budget``
    patches and skipped (left for a later pack, as a packer does) otherwise, until the pack is within 1/64 of
    the budget or ``max_skipped`` samples did not fit. The first sample is taken even if it alone exceeds the
    budget."""
    shapes, total, skipped, chunk = [], 0, 0, 0
    while True:
        for shape in latent_shapes(mix, 64, seed=seed * 1000 + chunk):
            n = num_patches(shape, patch_size)
            if shapes and total + n > token_budget:
                skipped += 1
            else:
                shapes.append(shape)
                total += n
            if total >= token_budget - token_budget // 64 or skipped >= max_skipped:
                return shapes
        chunk += 1
