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

Position embedding: the fixed 2-D sin-cos embedding of MAE/DiT, computed in float64. Token at patch row
h, column w gets ``concat(emb_1d(D/2, w), emb_1d(D/2, h))`` with
``emb_1d(D', pos) = concat(sin(pos * omega), cos(pos * omega))``, ``omega_i = 10000^(-i / (D'/2))``.
The packed path computes it from each token's ``(h, w)``, so images of any size and aspect are valid;
for the square ``input_size / p`` grid it is exactly the stored ``pos_embed`` table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from packdit.layout import PackedSeqs, pack, unpack
from packdit.reference.attention import varlen_attention

__all__ = ["DiT", "DiT_models", "get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed", "official_init", "guide_first_channels"]

RowsToTokens = Callable[[Tensor], Tensor]
"""Per-sample rows (B, k) -> a tensor that broadcasts against tokens (..., k): (B, 1, k) or (N, k)."""

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
"""q, k, v (*tokens, heads, head_dim) -> attention output (*tokens, heads, head_dim)."""


# ---------------------------------------------------------------------- position embedding
def get_1d_sincos_pos_embed(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) float64 ``concat(sin(pos*omega), cos(pos*omega))``."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = pos.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, h: Tensor, w: Tensor) -> Tensor:
    """Fixed 2-D sin-cos embedding of patches at rows ``h`` and columns ``w``, both (M,): -> (M, embed_dim) float64.

    The first half of the channels encodes the column w, the second half the row h (the official
    ``meshgrid(grid_w, grid_h)`` order). For ``h, w`` the raster coordinates of an S x S grid this is the
    official ``get_2d_sincos_pos_embed(embed_dim, S)`` table.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim: the 2-D sin-cos embedding needs a multiple of 4, got {embed_dim}")
    if h.shape != w.shape:
        raise ValueError(f"h, w: expected equal shapes, got {tuple(h.shape)} and {tuple(w.shape)}")
    return torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, w), get_1d_sincos_pos_embed(embed_dim // 2, h)], dim=1)


def _grid_pos_embed(embed_dim: int, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
    """(grid_h*grid_w, embed_dim) float64 embedding of a full grid in raster (row-major) order."""
    h = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    w = torch.arange(grid_w, device=device).repeat(grid_h)
    return get_2d_sincos_pos_embed(embed_dim, h, w)


# ---------------------------------------------------------------------- layers
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale already broadcast against x."""
    return x * (1 + scale) + shift


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-vectors by a stride-p ``Conv2d`` named ``proj`` (timm layout).

    ``num_patches`` and ``grid_size`` describe the ``input_size`` square the ``pos_embed`` table is for.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (input_size // patch_size, input_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D), L = (H/p)*(W/p) in raster order."""
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Packed patches (N, C*p*p) in (C, p, p) order -> (N, D): the conv as a Linear."""
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)


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


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, D): 256 sinusoidal frequencies, then ``Linear -> SiLU -> Linear``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
        """(B,) possibly fractional timesteps -> (B, dim) float32 ``concat(cos(t*f), sin(t*f))``.

        ``f_i = max_period^(-i / (dim//2))`` for i < dim//2 (computed in float32); an odd ``dim`` gets a
        trailing zero column.
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D) by an embedding table, with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has ``num_classes + 1`` rows; row ``num_classes`` is the
    "no class" embedding that dropped labels (and the unconditional half of CFG sampling) use.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null class ``num_classes``: where ``force_drop_ids == 1`` if given,
        else each with probability ``dropout_prob`` (one ``torch.rand`` draw per label on labels.device)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


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


def official_init(model: nn.Module) -> None:
    """The official DiT init, for any model with the official submodule names (``packdit.DiT`` too).

    Xavier-uniform Linears (zero bias), the sin-cos ``pos_embed`` table, the patch conv xavier-uniform
    as the (D, C*prod(patch)) matrix, N(0, 0.02) label table (if any) and timestep MLP weights, and zeros
    for every adaLN modulation Linear and the final Linear (adaLN-Zero). Same order of random draws as
    upstream, so the same seed gives the same weights.
    """

    def xavier_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(xavier_linear)
    grid_h, grid_w = model.x_embedder.grid_size
    table = _grid_pos_embed(model.pos_embed.shape[-1], grid_h, grid_w, model.pos_embed.device)
    model.pos_embed.data.copy_(table.float().unsqueeze(0))
    conv_weight = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(conv_weight.view(conv_weight.shape[0], -1))
    if hasattr(model, "y_embedder"):
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for layer in [block.adaLN_modulation[-1] for block in model.blocks] + [
            model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def guide_first_channels(model_out: Tensor, cfg_scale: float) -> Tensor:
    """The official CFG combination of ``model_out = [cond half; uncond half]`` (2B, C_out, ...).

    ``uncond + cfg_scale * (cond - uncond)`` on the first 3 channels, written to both halves; the other
    channels pass through. Upstream guides 3 channels "for exact reproducibility" of its samples (the
    standard choice would be all ``in_channels`` noise channels); kept for output parity.
    """
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


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

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
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
            pos_embed = _grid_pos_embed(self.pos_embed.shape[-1], *grid_hw, x.device).to(self.pos_embed.dtype)
        tokens = self.x_embedder(x) + pos_embed                               # (B, L, D)
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
        half = x[: len(x) // 2]
        return guide_first_channels(self.forward(torch.cat([half, half], dim=0), t, y), cfg_scale)

    # ------------------------------------------------------------------ packed path
    def forward_packed(self, tokens: Tensor, seqs: PackedSeqs, t: Tensor, y: Tensor) -> Tensor:
        """Packed images of any sizes: tokens (N, C*p*p), t (B,), y (B,) -> (N, p*p*C_out).

        ``tokens, seqs = packdit.pack(latents, patch_size=(1, p, p))``; the output token of each patch is
        ordered (p, p, C_out), so ``unpack(out, seqs, (1, p, p), channels_last=True)`` gives the images.
        Token positions come from ``seqs.positions`` (so dropped-token layouts work too: every kept token
        keeps its true (h, w)); attention stays inside each sample.
        """
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
        x = self.x_embedder.embed_tokens(tokens)                              # (N, D)
        pos_embed = get_2d_sincos_pos_embed(x.shape[-1], seqs.positions[:, 1], seqs.positions[:, 2])
        x = x + pos_embed.to(x.dtype)
        c = self._condition(t, y)                                             # (B, D)

        def rows_to_tokens(rows: Tensor) -> Tensor:
            return rows.index_select(0, segment_ids)                          # (B, k) -> (N, k)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return varlen_attention(q, k, v, seqs.cu_seqlens)

        return self._trunk(x, c, rows_to_tokens, attend)

    def forward_list(self, latents: Sequence[Tensor], t: Tensor, y: Tensor) -> list[Tensor]:
        """Images of any sizes ``[(C, H_b, W_b)]``, t (B,), y (B,) -> ``[(C_out, H_b, W_b)]``, via pack/unpack."""
        patch = (1, self.patch_size, self.patch_size)
        tokens, seqs = pack(latents, patch)
        out = self.forward_packed(tokens, seqs, t, y)
        return unpack(out, seqs, patch, channels_last=True)


# ---------------------------------------------------------------------- registry
_MODEL_SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def _registry_entry(size: str, patch_size: int) -> Callable[..., DiT]:
    depth, hidden_size, num_heads = _MODEL_SIZES[size]

    def build(**kwargs) -> DiT:
        config = dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
        return DiT(**{**config, **kwargs})

    build.__name__ = build.__qualname__ = f"DiT_{size}_{patch_size}"
    build.__doc__ = (f"DiT-{size}/{patch_size}: depth {depth}, hidden {hidden_size}, {num_heads} heads, "
                     f"patch {patch_size}; keyword arguments go to DiT (and may override these).")
    return build


DiT_models: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{p}": _registry_entry(size, p) for size in _MODEL_SIZES for p in (2, 4, 8)
}
"""The 12 official configurations, "DiT-XL/2" ... "DiT-S/8", each a constructor taking DiT kwargs."""
