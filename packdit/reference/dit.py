"""Reference DiT: the class-conditional adaLN-Zero Diffusion Transformer (Peebles & Xie, arXiv 2212.09748).

Checkpoint compatible with facebookresearch/DiT ``models.py``: same constructor, submodule names,
``state_dict`` keys/shapes, weight initialisation and (for the same seed) the same initial weights.

Shapes (D = hidden_size, p = patch_size, C = in_channels, C_out = 2C if learn_sigma else C)::

    batch path   x (B, C, H, W) --patchify--> (B, L, D), L = (H/p)*(W/p) --> (B, L, p*p*C_out) --> (B, C_out, H, W)
    packed path  tokens (N, C*p*p) from packdit.pack(latents, (1, p, p))  --> (N, D) --> (N, p*p*C_out)

    c = TimestepEmbed(t) + LabelEmbed(y)                                     (B, D), one row per sample

Every block is adaLN-Zero::

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)  each (B, D)
    x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)

with LN a LayerNorm without affine parameters (eps 1e-6), Attn multi-head self-attention with a biased
``qkv`` projection, MLP ``Linear -> GELU(tanh) -> Linear``. "Zero": the modulation Linear is
zero-initialised, so every block starts as the identity. The final layer is
``Linear(LN(x) * (1 + scale) + shift)`` with ``shift, scale = Linear(SiLU(c)).chunk(2)``, both
zero-initialised; each output token is a ``(p, p, C_out)`` patch (channels last, the official
``unpatchify`` order).

The two paths share the blocks: a block gets the per-sample conditioning ``c`` (B, D), a function that
spreads per-sample rows over the tokens (``rows[:, None]`` for a (B, L, D) batch, ``rows[segment_ids]``
for packed (N, D) tokens) and an attention function (dense per batch row, or
:func:`packdit.reference.varlen_attention` per packed sample, so samples never see each other and
nothing is padded).

The patch, timestep and label embedders, the sin-cos position table, the init and the CFG combination
are the shared official pieces of :mod:`packdit.official`; the blocks, attention and MLP here are the
oracle's own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from packdit.layout import PackedSeqs
from packdit.official import (
    OFFICIAL_CONFIGS,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    cfg_batch,
    check_loaded_pos_embed,
    get_2d_sincos_pos_embed,
    grid_pos_embed,
    guide_first_channels,
    official_init,
)
from packdit.reference.attention import varlen_attention
from packdit.reference.layout import layout_reference
from packdit.reference.patchify import patchify_reference, unpatchify_reference

__all__ = ["DiT", "DiT_models"]

RowsToTokens = Callable[[Tensor], Tensor]
"""Per-sample rows (B, k) -> a tensor that broadcasts against tokens (..., k): (B, 1, k) or (N, k)."""

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
"""q, k, v (*tokens, heads, head_dim) -> attention output (*tokens, heads, head_dim)."""


# ---------------------------------------------------------------------- layers
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale already broadcast against x."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention with fused ``qkv`` (bias) and ``proj`` Linears; scale head_dim**-0.5."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        """x (*tokens, D) -> (*tokens, D); ``attend`` decides which tokens see each other."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return self.proj(attend(q, k, v).flatten(-2))


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``, D -> hidden_features -> D."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block on tokens of any leading shape, (B, L, D) or packed (N, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, rows_to_tokens: RowsToTokens, attend: Attend) -> Tensor:
        """x (*tokens, D), c (B, D) -> (*tokens, D)."""
        modulation = rows_to_tokens(self.adaLN_modulation(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attend)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then ``Linear`` D -> p*p*C_out, each token a (p, p, C_out) patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, rows_to_tokens: RowsToTokens) -> Tensor:
        """x (*tokens, D), c (B, D) -> (*tokens, p*p*C_out)."""
        shift, scale = rows_to_tokens(self.adaLN_modulation(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _rows_over_sequence(rows: Tensor) -> Tensor:
    """(B, k) -> (B, 1, k), broadcasting over the L tokens of each batch row."""
    return rows.unsqueeze(1)


def _dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v (B, L, heads, head_dim) -> (B, L, heads, head_dim), all L tokens of a row attend to each other."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ---------------------------------------------------------------------- model
class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (DiT), class-conditional, adaLN-Zero.

    ``forward(x, t, y)``: x (B, C, H, W), t (B,) timesteps, y (B,) labels -> (B, C_out, H, W) where
    C_out = 2C with ``learn_sigma`` (noise and variance) else C. ``forward_packed`` and ``forward_list``
    run a batch of images of different sizes without padding.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size, input_size=input_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.register_load_state_dict_pre_hook(check_loaded_pos_embed)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        official_init(self)

    # ------------------------------------------------------------------ shared trunk
    def _condition(self, t: Tensor, y: Tensor) -> Tensor:
        """(B,) timesteps and labels -> c (B, D); labels are dropped at random in training mode."""
        return self.t_embedder(t) + self.y_embedder(y, self.training)

    def _trunk(self, x: Tensor, c: Tensor, rows_to_tokens: RowsToTokens, attend: Attend) -> Tensor:
        """Embedded tokens (*tokens, D) -> output patches (*tokens, p*p*C_out)."""
        for block in self.blocks:
            x = block(x, c, rows_to_tokens, attend)
        return self.final_layer(x, c, rows_to_tokens)

    # ------------------------------------------------------------------ batch path
    def unpatchify(self, x: Tensor, grid_hw: tuple[int, int] | None = None) -> Tensor:
        """(B, L, p*p*C_out) patches, each (p, p, C_out) -> images (B, C_out, H, W).

        ``grid_hw`` = (H/p, W/p); the default is the square grid of the official code (L must be a square).
        """
        c, p = self.out_channels, self.patch_size
        if grid_hw is None:
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"x: {x.shape[1]} patches are not a square grid; pass grid_hw=(H/p, W/p)")
            grid_hw = (side, side)
        h, w = grid_hw
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, C_out, H, W).

        At ``H = W = input_size`` this is the official forward (it adds the stored ``pos_embed``). Other
        sizes (H, W divisible by p) use the sin-cos embedding of their own patch grid, as ``forward_packed``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        p = self.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x: H, W = {tuple(x.shape[2:])} must be divisible by patch_size {p}")
        grid_hw = (x.shape[2] // p, x.shape[3] // p)
        if grid_hw == self.x_embedder.grid_size:
            pos_embed = self.pos_embed
        else:
            pos_embed = grid_pos_embed(self.pos_embed.shape[-1], *grid_hw, x.device).to(self.pos_embed.dtype)
        tokens = self.x_embedder.embed_images(x) + pos_embed                  # (B, L, D)
        c = self._condition(t, y)                                             # (B, D)
        out = self._trunk(tokens, c, _rows_over_sequence, _dense_attention)   # (B, L, p*p*C_out)
        return self.unpatchify(out, grid_hw)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance, the official sampling forward.

        x (2B, C, H, W): only the first half is used, duplicated; t (2B,); y (2B,) with the conditional
        labels first and the null class ``num_classes`` in the second half. Returns (2B, C_out, H, W) with
        ``uncond + cfg_scale * (cond - uncond)`` in both halves of the guided channels.

        As in the official code, guidance is applied to the first 3 output channels only (kept there
        "for exact reproducibility" of the published samples; the standard choice would be all
        ``in_channels`` noise channels). Channels 3: (the 4th latent noise channel and the variance
        channels) are returned unguided, each half from its own labels.
        """
        return guide_first_channels(self.forward(cfg_batch(x), t, y), cfg_scale)

    # ------------------------------------------------------------------ packed path
    def forward_packed(self, tokens: Tensor, seqs: PackedSeqs, t: Tensor, y: Tensor) -> Tensor:
        """Packed images of any sizes: tokens (N, C*p*p), t (B,), y (B,) -> (N, p*p*C_out).

        ``tokens, seqs = packdit.pack(latents, patch_size=(1, p, p))``; the output token of each patch is
        ordered (p, p, C_out), so ``unpack(out, seqs, (1, p, p), channels_last=True)`` gives the images.
        Token positions come from ``seqs.positions`` (so dropped-token layouts work too: every kept token
        keeps its true (h, w)); attention stays inside each sample. The layout is checked whatever
        ``packdit.checks`` says (``seqs.validate()``, once per layout object), as an oracle should.
        """
        seqs.validate()
        p = self.patch_size
        width = self.in_channels * p * p
        if tokens.dim() != 2 or tokens.shape[1] != width:
            raise ValueError(
                f"tokens: expected (N, in_channels*p*p) = (N, {width}) from pack(latents, patch_size=(1, {p}, {p})), "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.shape[0] != seqs.num_tokens:
            raise ValueError(f"tokens: {tokens.shape[0]} rows, but seqs describes {seqs.num_tokens} tokens")
        for b, (frames, _, _) in enumerate(seqs.grids):
            if frames != 1:
                raise ValueError(
                    f"seqs: sample {b} has T={frames} patch frames; the reference DiT is an image model (T must be 1)"
                )
        for name, v in (("t", t), ("y", y)):
            if v.dim() != 1 or v.shape[0] != len(seqs):
                raise ValueError(f"{name}: expected one entry per sample, shape ({len(seqs)},), got {tuple(v.shape)}")

        segment_ids = seqs.segment_ids.long()
        x = self.x_embedder(tokens)                                           # (N, D)
        pos_embed = get_2d_sincos_pos_embed(x.shape[-1], seqs.positions[:, 1], seqs.positions[:, 2])
        x = x + pos_embed.to(x.dtype)
        c = self._condition(t, y)                                             # (B, D)

        def rows_to_tokens(rows: Tensor) -> Tensor:
            return rows.index_select(0, segment_ids)                          # (B, k) -> (N, k)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return varlen_attention(q, k, v, seqs.cu_seqlens)

        return self._trunk(x, c, rows_to_tokens, attend)

    def forward_list(self, latents: Sequence[Tensor], t: Tensor, y: Tensor) -> list[Tensor]:
        """Images of any sizes ``[(C, H_b, W_b)]``, t (B,), y (B,) -> ``[(C_out, H_b, W_b)]``, packed and unpacked
        by the reference patchify (no kernel)."""
        p = self.patch_size
        patch = (1, p, p)
        for b, x in enumerate(latents):
            if x.dim() != 3 or x.shape[1] % p or x.shape[2] % p:
                raise ValueError(f"latents[{b}]: expected a (C, H, W) image with H, W divisible by {p}, "
                                 f"got {tuple(x.shape)}")
        seqs = layout_reference([(1, x.shape[1] // p, x.shape[2] // p) for x in latents], [3] * len(latents),
                                latents[0].device)
        tokens = patchify_reference(latents, seqs.cu_seqlens, None, patch)
        out = self.forward_packed(tokens, seqs, t, y)
        return unpatchify_reference(out, seqs.cu_seqlens, None, seqs.grids, seqs.sample_ndims, patch,
                                    channels_last=True)


# ---------------------------------------------------------------------- registry
DiT_models: dict[str, Callable[..., DiT]] = {
    name: functools.partial(DiT, **config) for name, config in OFFICIAL_CONFIGS.items()
}
"""The 12 official configurations, "DiT-XL/2" ... "DiT-S/8", each a constructor taking DiT kwargs (which
may override the configuration's)."""
