"""``DiTConfig``: every construction option of :class:`packdit.DiT`, checked together, and the table of named
configurations (``DIT_CONFIGS``) that ``DiT_models`` builds from.

The first ten fields are the official DiT constructor's, in its positional order, so
``DiT(32, 2, 4, 1152, 28, 16, 4.0, 0.1, 1000, True)`` still works; the rest are keyword-only video and
NaViT options whose defaults keep official compatibility. ``__post_init__`` refuses a combination in
which an option would be silently ignored (``max_grid`` or ``fractional_positions`` without
``pos_embed="factorized"``, ``rope`` without ``"rope3d"``, ``text_dim`` with class conditioning,
spatial-temporal attention in an image model) or could not be built, instead of building a model that
does not do what was asked. What a call gives that the configuration cannot honour (a video for an image
model, labels for a text model, a context for a class model) is refused by the forward.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from packdit.layout import normalize_patch_size
from packdit.official import OFFICIAL_CONFIGS
from packdit.rope import RoPE3D

__all__ = ["DiTConfig", "DIT_CONFIGS", "POS_EMBEDS", "ATTENTIONS", "CONDS", "default_rope"]

POS_EMBEDS = ("sincos2d", "factorized", "rope3d")
ATTENTIONS = ("full", "spatial_temporal")
CONDS = ("class", "text")
MODEL_BACKENDS = ("triton", "torch")
DEFAULT_MAX_GRID = (64, 128, 128)


def default_rope(head_dim: int, theta: float = 10000.0) -> RoPE3D:
    """3/8 of the head dim each to h and w, the rest to t (72 -> (20, 26, 26), 128 -> (32, 48, 48))."""
    hw = 2 * (head_dim * 3 // 16)
    return RoPE3D(theta=theta, axes_dims=(head_dim - 2 * hw, hw, hw))


def _finite_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Construction options of :class:`packdit.DiT` (see :mod:`packdit.models.dit` for what each does).

    ``rope=None`` with ``pos_embed="rope3d"`` means :func:`default_rope` of the head dim, and
    ``max_grid=None`` with ``"factorized"`` means (64, 128, 128) patches along (t, h, w); the config keeps
    the ``None`` so that ``dataclasses.replace(config, hidden_size=...)`` re-derives them
    (:attr:`resolved_rope`, :attr:`resolved_max_grid`). ``backend``: ``None`` (chosen per call),
    ``"triton"`` or ``"torch"``.
    """

    input_size: int = 32
    patch_size: int | tuple[int, ...] = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    _: dataclasses.KW_ONLY
    pos_embed: str = "sincos2d"
    attention: str = "full"
    rope: RoPE3D | None = None
    max_grid: tuple[int, int, int] | None = None
    fractional_positions: bool = False
    qk_norm: bool = False
    cond: str = "class"
    text_dim: int | None = None
    checkpoint_activations: bool = False
    backend: str | None = None

    def __post_init__(self):
        if not isinstance(self.patch_size, int):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
        normalize_patch_size(self.patch_size)
        if self.max_grid is not None:
            object.__setattr__(self, "max_grid", tuple(self.max_grid))
        for name, minimum in (("input_size", 1), ("in_channels", 1), ("hidden_size", 1), ("num_heads", 1),
                              ("num_classes", 1), ("depth", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                kind = "positive" if minimum else "non-negative"
                raise ValueError(f"{name}: expected a {kind} int, got {value!r}")
        if not _finite_real(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected a finite number > 0, got {self.mlp_ratio!r}")
        if not _finite_real(self.class_dropout_prob) or not 0 <= self.class_dropout_prob <= 1:
            raise ValueError(f"class_dropout_prob: expected a probability in [0, 1], got {self.class_dropout_prob!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name, allowed in (("pos_embed", POS_EMBEDS), ("attention", ATTENTIONS), ("cond", CONDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.backend is not None and self.backend not in MODEL_BACKENDS:
            raise ValueError(f"backend: expected one of {MODEL_BACKENDS} or None (chosen per call), "
                             f"got {self.backend!r}")
        if self.cond == "text" and (isinstance(self.text_dim, bool) or not isinstance(self.text_dim, numbers.Integral)
                                    or self.text_dim < 1):
            raise ValueError(f"text_dim: expected a positive int for cond='text' (the width of the text "
                             f"embeddings), got {self.text_dim!r}")
        if self.cond == "class" and self.text_dim is not None:
            raise ValueError(f"text_dim: given ({self.text_dim}), but cond='class' has no text; use cond='text'")
        if self.rope is not None and self.pos_embed != "rope3d":
            raise ValueError(f"rope: given, but pos_embed={self.pos_embed!r}; use pos_embed='rope3d'")
        if self.pos_embed != "factorized":
            for name, value, default in (("max_grid", self.max_grid, None),
                                         ("fractional_positions", self.fractional_positions, False)):
                if value != default:
                    raise ValueError(f"{name}: given ({value}), but only pos_embed='factorized' uses it, "
                                     f"got pos_embed={self.pos_embed!r}")
        if self.max_grid is not None and (len(self.max_grid) != 3 or min(self.max_grid) < 1):
            raise ValueError(f"max_grid: expected three positive ints (T, H, W), got {self.max_grid}")
        if self.pos_embed == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"hidden_size: pos_embed='sincos2d' needs a multiple of 4 (sin and cos of h and w), "
                             f"got {self.hidden_size}")
        if self.attention == "spatial_temporal" and self.image_only:
            raise ValueError(f"attention: 'spatial_temporal' attends across frames, but the 2-D patch_size "
                             f"{self.patch_size} makes an image model, which takes no videos; use "
                             f"patch_size=(pt, ph, pw)")
        if self.pos_embed == "rope3d":
            self.resolved_rope.check_head_dim(self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def image_only(self) -> bool:
        """2-D patches (an int or (ph, pw)): the official image model, a ``Conv2d`` patch embedding."""
        return isinstance(self.patch_size, int) or len(self.patch_size) == 2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def resolved_rope(self) -> RoPE3D | None:
        if self.pos_embed != "rope3d":
            return None
        return self.rope if self.rope is not None else default_rope(self.head_dim)

    @property
    def resolved_max_grid(self) -> tuple[int, int, int] | None:
        if self.pos_embed != "factorized":
            return None
        return self.max_grid if self.max_grid is not None else DEFAULT_MAX_GRID


DIT_CONFIGS: dict[str, DiTConfig] = {name: DiTConfig(**options) for name, options in OFFICIAL_CONFIGS.items()}
# Video configs for benchmarks: STDiT-XL/2-like (28 x 1152, head dim 72, spacetime patches) and a 3B-class
# model (hidden 3072, head dim 128). Both use 3-D patches, so their patch embedding is a Conv3d.
DIT_CONFIGS["STDiT-XL/2"] = DiTConfig(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), qk_norm=True,
                                      attention="spatial_temporal")
DIT_CONFIGS["DiT-3B"] = DiTConfig(depth=32, hidden_size=3072, num_heads=24, patch_size=(1, 2, 2), qk_norm=True,
                                  pos_embed="rope3d")
