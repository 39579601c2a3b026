"""``packdit.DiT``: the adaLN-Zero DiT on packed batches of images and videos (arXiv 2212.09748, 2307.06304).

With the default arguments it is ``packdit.reference.DiT`` -- same constructor, ``state_dict`` keys,
initialization and ``forward(x, t, y)`` / ``forward_with_cfg`` -- so ``DiT_models["DiT-XL/2"]()`` loads an
official checkpoint with ``strict=True``. Underneath, every call runs on packed tokens without padding:

    tokens (N, C*pt*ph*pw) --patch Linear--> (N, D) (+ position embedding)
    c (R, D) = TimestepEmbed(t) + LabelEmbed(y) [+ pooled text]       R = B, or one row per frame
    blocks:  x = x + gate1[i] * Attn(norm(x) * (1 + scale1[i]) + shift1[i])      i = mod_index (N,)
             [x = x + CrossAttn(x, text)]
             x = x + gate2[i] * MLP(norm(x) * (1 + scale2[i]) + shift2[i])
    final:   Linear(norm(x) * (1 + scale[i]) + shift[i]) -> (N, pt*ph*pw*C_out), channels last

Construction options are the fields of :class:`~packdit.models.config.DiTConfig` (``DiT(config)`` or the
official positional arguments plus keywords); ``DiT_models[name]()`` builds a named configuration. Video and
NaViT options (keyword-only; the defaults keep official compatibility; options the rest of the
configuration would ignore are refused):

* ``patch_size=(pt, ph, pw)``: spacetime patches (the patch embedding is then a ``Conv3d`` weight).
* ``pos_embed``: ``"sincos2d"`` (official 2-D table from each token's (h, w); videos add a 1-D
  sin-cos over t, shifted so that t = 0 adds nothing and images stay exactly official),
  ``"factorized"`` (NaViT learned t/h/w tables up to ``max_grid``, optionally at fractional coordinates) or
  ``"rope3d"`` (no additive embedding: 3-D rotary embedding ``rope`` of q and k inside the attention kernel).
  Only ``"sincos2d"`` stores the fixed ``pos_embed`` table, as official checkpoints do.
* ``attention``: ``"full"`` (each token sees its whole sample) or ``"spatial_temporal"`` (blocks
  alternate spatial attention within a frame and temporal attention across frames, as STDiT).
* ``cond="text"``: cross-attention from the packed video tokens to a packed, per-sample,
  variable-length text sequence (``context``: list of ``(L_b, text_dim)``), plus its mean-pooled vector
  added to ``c``. An empty context (``L_b = 0``) is the unconditional branch for CFG.
* per-frame or per-token timesteps: ``t`` of shape ``(B,)``, ``(sum_b T_b,)`` (one per patch frame:
  diffusion forcing, image-to-video) or ``(N,)``. Modulation rows are computed once per distinct row
  (``R`` rows, not ``N``) and gathered by ``mod_index`` inside the fused kernels.
* ``qk_norm``: RMSNorm on queries and keys per head.
* ``checkpoint_activations``: recompute each block in backward.
* ``backend``: ``"torch"`` (reference ops) or ``"triton"`` (fused kernels); ``None`` chooses per call from
  the tensors' device (:mod:`packdit.nn.functional`), so the same model runs the kernels on a GPU and the
  reference on CPU tensors.

The timestep/label embedders and the adaLN projections stay in plain PyTorch: they are O(R D^2) with R
the number of samples or frames, not O(N).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from packdit._validate import checks_enabled
from packdit.layout import PackedSeqs, normalize_patch_size
from packdit.models.config import DIT_CONFIGS, DiTConfig
from packdit.nn import (
    AdaLNModulation,
    FusedMLP,
    GatedResidual,
    ModulatedNorm,
    PackedAttention,
    PackedCrossAttention,
    segment_pool,
)
from packdit.official import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    guide_first_channels,
    official_init,
)
from packdit.patches import pack, unpack
from packdit.rope import RoPE3D

__all__ = ["DiT", "DiT_models", "DiTConfig", "DIT_CONFIGS"]

class DiTBlock(nn.Module):
    """adaLN-Zero block on packed tokens; state_dict names match the official ``DiTBlock``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, qk_norm: bool, cross: bool,
                 mode: str, rope: RoPE3D | None, backend: str | None):
        super().__init__()
        self.norm1 = ModulatedNorm(hidden_size, backend=backend)
        self.attn = PackedAttention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope, mode=mode, backend=backend)
        self.norm2 = ModulatedNorm(hidden_size, backend=backend)
        self.mlp = FusedMLP(hidden_size, int(hidden_size * mlp_ratio), backend=backend)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.cross_attn = (PackedCrossAttention(hidden_size, num_heads, qk_norm=qk_norm, backend=backend)
                           if cross else None)
        self.residual = GatedResidual(backend=backend)

    def forward(self, x: Tensor, c: Tensor, mod_index: Tensor, seqs: PackedSeqs,
                context: Tensor | None = None, context_seqs: PackedSeqs | None = None) -> Tensor:
        """x (N, D), c (R, D), mod_index (N,) -> (N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)
        x = self.residual(x, self.attn(self.norm1(x, shift1, scale1, mod_index), seqs), gate1, mod_index)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, seqs, context, context_seqs.cu_seqlens, context_seqs.max_seqlen)
        return self.mlp(self.norm2(x, shift2, scale2, mod_index), x, gate2, mod_index)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then ``Linear`` D -> pt*ph*pw*C_out; official names."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, backend: str | None):
        super().__init__()
        self.norm_final = ModulatedNorm(hidden_size, backend=backend)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels, bias=True)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 2)

    def forward(self, x: Tensor, c: Tensor, mod_index: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)
        return self.linear(self.norm_final(x, shift, scale, mod_index))


class DiT(nn.Module):
    """Packed DiT; see the module docstring.

    ``DiT(config)`` with a :class:`~packdit.models.config.DiTConfig` (keywords override its fields), or
    ``DiT(input_size, patch_size, ..., learn_sigma, *, pos_embed=..., ...)`` with the fields of
    ``DiTConfig``: the official positional arguments first. ``self.config`` is what was built.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        if args and isinstance(args[0], DiTConfig):
            if len(args) > 1:
                raise TypeError("DiT(config, ...): pass the fields to override as keywords")
            config = dataclasses.replace(args[0], **kwargs)
        else:
            config = DiTConfig(*args, **kwargs)
        self.config = config
        self.backend = config.backend
        self.image_only = config.image_only
        self.patch_size = normalize_patch_size(config.patch_size)
        self.in_channels, self.out_channels = config.in_channels, config.out_channels
        self.learn_sigma, self.num_heads, self.cond = config.learn_sigma, config.num_heads, config.cond
        self.pos_embed_type, self.fractional_positions = config.pos_embed, config.fractional_positions
        self.checkpoint_activations = config.checkpoint_activations
        self.attention = config.attention
        self.rope = config.resolved_rope
        hidden = config.hidden_size

        # construction order follows the official model (same seed -> same initial weights)
        self.x_embedder = PatchEmbed(config.in_channels, hidden, config.patch_size, input_size=config.input_size)
        self.t_embedder = TimestepEmbedder(hidden)
        if config.cond == "class":
            self.y_embedder = LabelEmbedder(config.num_classes, hidden, config.class_dropout_prob)
        else:
            self.context_embedder = nn.Sequential(nn.Linear(config.text_dim, hidden), nn.GELU(approximate="tanh"),
                                                  nn.Linear(hidden, hidden))
            self.pooled_context = nn.Linear(hidden, hidden)
        if config.pos_embed == "sincos2d":  # a fixed table kept only because official checkpoints hold it
            self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden), requires_grad=False)
        elif config.pos_embed == "factorized":
            self.max_grid = config.resolved_max_grid
            self.pos_embed_t, self.pos_embed_h, self.pos_embed_w = (
                nn.Parameter(torch.zeros(n, hidden)) for n in self.max_grid)
        modes = ["spatial", "temporal"] if config.attention == "spatial_temporal" else ["full"]
        self.blocks = nn.ModuleList([
            DiTBlock(hidden, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm, cross=config.cond == "text",
                     mode=modes[i % len(modes)], rope=self.rope, backend=self.backend)
            for i in range(config.depth)
        ])
        self.final_layer = FinalLayer(hidden, math.prod(self.patch_size), self.out_channels, self.backend)
        self.initialize_weights()

    # ------------------------------------------------------------------ init (official)
    def initialize_weights(self) -> None:
        official_init(self)
        if self.pos_embed_type == "factorized":
            for table in (self.pos_embed_t, self.pos_embed_h, self.pos_embed_w):
                nn.init.normal_(table, std=0.02)

    # ------------------------------------------------------------------ embeddings
    def _position_embedding(self, seqs: PackedSeqs, dim: int) -> Tensor:
        """(N, dim) embedding of each token's true (t, h, w) (kept coordinates survive token dropping)."""
        pos = seqs.positions.long()
        if self.pos_embed_type == "sincos2d":
            emb = get_2d_sincos_pos_embed(dim, pos[:, 1], pos[:, 2])
            if not self.image_only:  # sincos over t minus its t=0 value: images get exactly the official table
                zero = torch.zeros(1, dtype=torch.long, device=pos.device)
                emb = emb + get_1d_sincos_pos_embed(dim, pos[:, 0]) - get_1d_sincos_pos_embed(dim, zero)
            return emb
        tables = (self.pos_embed_t, self.pos_embed_h, self.pos_embed_w)
        if self.fractional_positions:  # NaViT: coordinate / extent of its own axis, scaled to the table
            grid = seqs.grid.long()[seqs.segment_ids.long()]
            idx = [(pos[:, a] * len(tables[a])) // grid[:, a].clamp_min(1) for a in range(3)]
        else:
            idx = [pos[:, a] for a in range(3)]
            # one device->host read per forward, skipped with packdit.checks(False) and under torch.compile
            for a, name in enumerate("thw" if checks_enabled() and not torch.compiler.is_compiling() else ""):
                if pos.shape[0] and int(idx[a].max()) >= len(tables[a]):
                    raise ValueError(f"seqs: a {name} position of {int(idx[a].max())} exceeds max_grid "
                                     f"{self.max_grid}; raise max_grid or use fractional_positions=True")
        return sum(table[i] for table, i in zip(tables, idx))

    def _condition(self, t: Tensor, y: Tensor | None, seqs: PackedSeqs, context, context_seqs):
        """-> c (R, D) modulation conditioning and mod_index (N,): the row of each token."""
        b, n = len(seqs), seqs.num_tokens
        if t.dim() != 1:
            raise ValueError(f"t: expected a 1-D tensor, got shape {tuple(t.shape)}")
        if t.shape[0] == b:  # the common case reads no host metadata (no guards under torch.compile)
            row_of_sample, mod_index = torch.arange(b, device=t.device), seqs.segment_ids
        elif t.shape[0] == sum(frames := [g[0] for g in seqs.grids]):  # per frame: row = sample's first frame + t
            first_frame = torch.tensor([0] + frames[:-1], device=t.device).cumsum(0)
            row_of_sample = torch.repeat_interleave(torch.arange(b, device=t.device),
                                                    torch.tensor(frames, device=t.device), output_size=t.shape[0])
            mod_index = (first_frame[seqs.segment_ids.long()] + seqs.positions[:, 0]).to(torch.int32)
        elif t.shape[0] == n:
            row_of_sample = seqs.segment_ids.long()
            mod_index = torch.arange(n, dtype=torch.int32, device=t.device)
        else:
            raise ValueError(f"t: expected {b} (per sample), {sum(frames)} (per frame) or {n} (per token) "
                             f"timesteps, got {t.shape[0]}")
        c = self.t_embedder(t)
        if self.cond == "class":
            if y is None or y.shape != (b,):
                raise ValueError(f"y: expected ({b},) class labels, got {None if y is None else tuple(y.shape)}")
            c = c + self.y_embedder(y, self.training)[row_of_sample]
        else:
            c = c + self.pooled_context(segment_pool(context, context_seqs, "mean"))[row_of_sample]
        return c, mod_index

    def _pack_context(self, context):
        if self.cond != "text":
            return None, None
        if context is None:
            raise ValueError("context: cond='text' needs a list of (L_b, text_dim) text embeddings")
        if isinstance(context, tuple):  # already packed: (tokens (M, text_dim), PackedSeqs)
            ctx, ctx_seqs = context
        else:
            ctx = torch.cat(list(context))
            ctx_seqs = PackedSeqs.from_grids([(1, 1, c.shape[0]) for c in context], device=ctx.device)
        return self.context_embedder(ctx), ctx_seqs

    # ------------------------------------------------------------------ forwards
    def forward_packed(self, tokens: Tensor, seqs: PackedSeqs, t: Tensor, y: Tensor | None = None,
                       context=None) -> Tensor:
        """tokens (N, C*pt*ph*pw) from ``packdit.pack(latents, patch_size)``, t (B,) | (sum T_b,) | (N,),
        y (B,) labels or ``context`` (list of (L_b, text_dim), or packed ``(tokens, seqs)``)
        -> (N, pt*ph*pw*C_out), each token channels-last (``unpack(..., channels_last=True)``)."""
        width = self.in_channels * math.prod(self.patch_size)
        if tokens.dim() != 2 or tokens.shape != (seqs.num_tokens, width):
            raise ValueError(f"tokens: expected ({seqs.num_tokens}, {width}) packed patches of seqs, "
                             f"got {tuple(tokens.shape)}")
        if len(context or ()) not in (0, len(seqs)) and not isinstance(context, tuple):
            raise ValueError(f"context: expected {len(seqs)} per-sample text sequences, got {len(context)}")
        x = self.x_embedder(tokens)
        if self.pos_embed_type != "rope3d":  # rope3d rotates q and k inside attention instead
            x = x + self._position_embedding(seqs, x.shape[-1]).to(x.dtype)
        ctx, ctx_seqs = self._pack_context(context)
        c, mod_index = self._condition(t, y, seqs, ctx, ctx_seqs)
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                x = checkpoint(block, x, c, mod_index, seqs, ctx, ctx_seqs, use_reentrant=False)
            else:
                x = block(x, c, mod_index, seqs, ctx, ctx_seqs)
        return self.final_layer(x, c, mod_index)

    def forward(self, x, t: Tensor, y: Tensor | None = None, context=None):
        """``x (B, C, H, W)`` (official batch call) -> ``(B, C_out, H, W)``; or ``x`` a list of ``(C, H, W)`` /
        ``(C, T, H, W)`` latents of any sizes -> list of predictions in the same shapes."""
        if isinstance(x, Tensor):
            if x.dim() not in (4, 5):
                raise ValueError(f"x: expected (B, C, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
            return torch.stack(self.forward(list(x.unbind(0)), t, y, context))
        tokens, seqs = pack(x, self.patch_size)
        out = self.forward_packed(tokens, seqs, t, y, context)
        return unpack(out, seqs, self.patch_size, channels_last=True)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """The official classifier-free-guidance forward (guidance on the first 3 channels, as upstream)."""
        half = x[: len(x) // 2]
        return guide_first_channels(self.forward(torch.cat([half, half]), t, y), cfg_scale)


# ---------------------------------------------------------------------- registry
def _entry(config: DiTConfig) -> Callable[..., DiT]:
    def build(**overrides) -> DiT:
        return DiT(config, **overrides)

    build.__doc__ = f"DiT({config}); keyword arguments override its fields."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {name: _entry(config) for name, config in DIT_CONFIGS.items()}
"""``DiT_models[name](**overrides)``: a DiT of the named configuration (:data:`DIT_CONFIGS`)."""
