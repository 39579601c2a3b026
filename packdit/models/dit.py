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
  ``"rope3d"`` (no additive embedding: 3-D rotary embedding ``rope`` of q and k, once per layer, fused with the
  QK-norm). Only ``"sincos2d"`` stores the fixed ``pos_embed`` table, as official checkpoints do.
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

Sequence parallelism (``DiT(..., sequence_parallel=group)`` or :meth:`DiT.set_sequence_parallel`; the group is
a runtime argument, not a config field: a process group is a communicator, not a property of the model). The
P ranks of ``group`` run each packed batch together, 1/P of its tokens each (Ulysses, see
:mod:`packdit.distributed.ulysses`). Contract:

* every rank of the group calls the model with the same inputs (latents or packed tokens and layout, ``t``,
  ``y`` / ``context``) and gets the same, whole outputs;
* every rank computes the same loss from them and calls ``backward()``; then every rank's parameter ``.grad``
  is what one process computes for that loss, up to fp32 summation order -- no extra call.

How the gradient is counted once. Rank r runs the token-local layers on its shard only; the outputs are
all-gathered, and the gather's backward keeps rank r's rows of the output gradient (the loss is replicated,
so its gradient is the same on every rank: summing the P copies would count the loss P times). Backward then
flows through rank r's shard, the all-to-alls route the attention gradients to the ranks owning those tokens,
and the replicated conditioning (timestep and label embedders, pooled text, adaLN projections, the text
context) receives the gradient of rank r's tokens only. So every parameter's gradient on rank r is the part
due to its own tokens, and the parts sum to the whole: the model all-reduces (sums) each parameter's fresh
gradient over the group in a hook before it is accumulated into ``.grad`` (accumulating micro-batches stays
correct). Inputs that require grad (tokens, ``t``, ``context``, e.g. from a text encoder trained jointly) get
their whole gradient on every rank: the token slice all-gathers its gradient, the replicated conditioning
inputs all-reduce theirs. Label dropout in training draws on the group's first rank and is broadcast.

Inside a data-parallel wrapper over all ranks (DDP, FSDP2) pass ``reduce_gradients=False``: the wrapper's
all-reduce then sums the ranks' parts, group by group, as :class:`packdit.train.Trainer` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from packdit._validate import checks_enabled, validate_seqs
from packdit.distributed import SequenceParallel, SequenceShard, check_heads
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
    cfg_batch,
    check_loaded_pos_embed,
    check_timesteps,
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
                context: Tensor | None = None, context_seqs: PackedSeqs | None = None,
                shard: SequenceShard | None = None) -> Tensor:
        """x (N, D), c (R, D), mod_index (N,) -> (N, D). With ``shard`` (sequence parallelism) x, mod_index and
        seqs are the shard's tokens and layout; self-attention runs over the whole batch ``shard.seqs``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)
        h = self.norm1(x, shift1, scale1, mod_index)
        h = self.attn(h, seqs) if shard is None else self.attn(h, shard.seqs, shard)
        x = self.residual(x, h, gate1, mod_index)
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
    ``sequence_parallel``: a ``torch.distributed`` process group (or None) that runs every call together,
    see the module docstring and :meth:`set_sequence_parallel`.
    """

    def __init__(self, *args, sequence_parallel: dist.ProcessGroup | None = None, **kwargs):
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
            self.register_load_state_dict_pre_hook(check_loaded_pos_embed)
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
        self._grad_hooks: dict[str, int] = {}  # parameter name -> id of the Parameter its reduction hook is on
        self._grad_reduction: SequenceParallel | None = None  # the group the pending backward sums over
        self.set_sequence_parallel(sequence_parallel)

    # ------------------------------------------------------------------ sequence parallelism
    @property
    def sequence_parallel(self) -> dist.ProcessGroup | None:
        """The process group running each call together (None: this process alone)."""
        return None if self._sequence_parallel is None else self._sequence_parallel.group

    def set_sequence_parallel(self, group: dist.ProcessGroup | None, *, reduce_gradients: bool = True) -> None:
        """Run the next calls over ``group`` (None, or a group of one rank: alone). ``reduce_gradients``: sum each
        parameter's gradient over the group in backward (the module docstring's contract); False inside a
        data-parallel wrapper over every rank, whose all-reduce sums the ranks' parts itself. ValueError if the
        group size does not divide ``num_heads``."""
        sp = None if group is None else SequenceParallel(group)
        if sp is not None and sp.size == 1:
            sp = None
        if sp is not None:
            check_heads(self.num_heads, sp.size)
        self._sequence_parallel, self._reduce_gradients = sp, bool(reduce_gradients)

    def _track_gradient_reduction(self) -> None:
        """At a forward with autograd on: the group its backward sums parameter gradients over (None: no sum), and
        a reduction hook on every parameter that requires grad (once per Parameter object)."""
        self._grad_reduction = self._sequence_parallel if self._reduce_gradients else None
        if self._grad_reduction is None:
            return
        for name, param in self.named_parameters():
            if param.requires_grad and self._grad_hooks.get(name) != id(param):
                param.register_hook(self._reduce_gradient)
                self._grad_hooks[name] = id(param)

    def _reduce_gradient(self, grad: Tensor) -> Tensor:
        if self._grad_reduction is None:
            return grad
        grad = grad.clone()
        dist.all_reduce(grad, group=self._grad_reduction.group)
        return grad

    # ------------------------------------------------------------------ init (official)
    def initialize_weights(self) -> None:
        official_init(self)
        if self.pos_embed_type == "factorized":
            for table in (self.pos_embed_t, self.pos_embed_h, self.pos_embed_w):
                nn.init.normal_(table, std=0.02)

    # ------------------------------------------------------------------ embeddings
    def _position_embedding(self, seqs: PackedSeqs, dim: int, shard: SequenceShard | None = None) -> Tensor:
        """(N, dim) embedding of each token's true (t, h, w) (kept coordinates survive token dropping); with
        ``shard``, of the shard's tokens."""
        tokens = seqs if shard is None else shard.local
        pos = tokens.positions.long()
        if self.pos_embed_type == "sincos2d":
            emb = get_2d_sincos_pos_embed(dim, pos[:, 1], pos[:, 2])
            if not self.image_only:  # sincos over t minus its t=0 value: images get exactly the official table
                zero = torch.zeros(1, dtype=torch.long, device=pos.device)
                emb = emb + get_1d_sincos_pos_embed(dim, pos[:, 0]) - get_1d_sincos_pos_embed(dim, zero)
            return emb
        tables = (self.pos_embed_t, self.pos_embed_h, self.pos_embed_w)
        if self.fractional_positions:  # NaViT: coordinate / extent of its own axis, scaled to the table
            grid = seqs.grid.long()[tokens.segment_ids.long()]
            idx = [(pos[:, a] * len(tables[a])) // grid[:, a].clamp_min(1) for a in range(3)]
        else:
            idx = [pos[:, a] for a in range(3)]
            # one device->host read per forward, skipped with packdit.checks(False) and under torch.compile; on
            # the whole batch, so that every rank of a sequence-parallel group raises, not only the shard's
            check = checks_enabled() and not torch.compiler.is_compiling() and seqs.num_tokens > 0
            top = seqs.positions.amax(0).tolist() if check else []
            for a, name in enumerate("thw" if check else ""):
                if top[a] >= len(tables[a]):
                    raise ValueError(f"seqs: a {name} position of {top[a]} exceeds max_grid "
                                     f"{self.max_grid}; raise max_grid or use fractional_positions=True")
        return sum(table[i] for table, i in zip(tables, idx))

    def _condition(self, t: Tensor, y: Tensor | None, seqs: PackedSeqs, context, context_seqs,
                   shard: SequenceShard | None = None):
        """-> c (R, D) modulation conditioning and mod_index (N,): the row of each token. With ``shard``, the
        rows of the shard's tokens (per-token timesteps: the shard's rows only)."""
        b, n = len(seqs), seqs.num_tokens
        tokens = seqs if shard is None else shard.local  # the layout of the tokens this process runs
        check_timesteps(t)
        per_token = False
        if t.shape[0] == b:  # the common case reads no host metadata (no guards under torch.compile)
            row_of_sample, mod_index = torch.arange(b, device=t.device), tokens.segment_ids
        elif t.shape[0] == sum(frames := [g[0] for g in seqs.grids]):  # per frame: row = sample's first frame + t
            first_frame = torch.tensor([0] + frames[:-1], device=t.device).cumsum(0)
            row_of_sample = torch.repeat_interleave(torch.arange(b, device=t.device),
                                                    torch.tensor(frames, device=t.device), output_size=t.shape[0])
            mod_index = (first_frame[tokens.segment_ids.long()] + tokens.positions[:, 0]).to(torch.int32)
        elif t.shape[0] == n:
            per_token = True
            t = t if shard is None else shard.scatter(t)  # the shard's rows (gradient all-gathered)
            row_of_sample = tokens.segment_ids.long()
            mod_index = torch.arange(tokens.num_tokens, dtype=torch.int32, device=t.device)
        else:
            raise ValueError(f"t: expected {b} (per sample), {sum(frames)} (per frame) or {n} (per token) "
                             f"timesteps, got {t.shape[0]}")
        if shard is not None and not per_token:  # every rank uses its tokens' rows (gradient all-reduced)
            t = shard.replicate(t)
        c = self.t_embedder(t)
        if self.cond == "class":
            if not isinstance(y, Tensor) or y.shape != (b,):
                got = tuple(y.shape) if isinstance(y, Tensor) else y
                raise ValueError(f"y: expected ({b},) class labels, got {got}")
            if shard is not None and self.training and self.y_embedder.dropout_prob > 0:
                y = shard.broadcast(self.y_embedder.token_drop(y))  # one draw for the whole group
            c = c + self.y_embedder(y, self.training and shard is None)[row_of_sample]
        else:
            c = c + self.pooled_context(segment_pool(context, context_seqs, "mean"))[row_of_sample]
        return c, mod_index

    def _pack_context(self, context, num_samples: int, shard: SequenceShard | None = None):
        """``context`` (a list of B ``(L_b, text_dim)`` tensors, or packed ``(tokens (M, text_dim), PackedSeqs)``)
        -> embedded tokens (M, D) and their layout; (None, None) for class conditioning. With ``shard`` the
        context is replicated on every rank of the group."""
        if self.cond != "text":
            return None, None
        text_dim = self.config.text_dim
        if (isinstance(context, tuple) and len(context) == 2 and isinstance(context[1], PackedSeqs)
                and not isinstance(context[0], PackedSeqs)):
            ctx, ctx_seqs = context
            validate_seqs(ctx_seqs, "context[1]")
            if len(ctx_seqs) != num_samples:
                raise ValueError(f"context[1]: expected a layout of {num_samples} text sequences, one per sample, "
                                 f"got {len(ctx_seqs)}")
            if not isinstance(ctx, Tensor) or ctx.shape != (ctx_seqs.num_tokens, text_dim):
                got = tuple(ctx.shape) if isinstance(ctx, Tensor) else type(ctx).__name__
                raise ValueError(f"context[0]: expected ({ctx_seqs.num_tokens}, {text_dim}) text tokens of "
                                 f"context[1], got {got}")
        else:
            if isinstance(context, Tensor) or not isinstance(context, (list, tuple)):
                raise ValueError(f"context: expected a list of {num_samples} (L_b, text_dim={text_dim}) tensors or a "
                                 f"packed (tokens, PackedSeqs) pair, got {type(context).__name__}")
            if len(context) != num_samples:
                raise ValueError(f"context: expected {num_samples} text sequences (L_b, text_dim={text_dim}), one "
                                 f"per sample, got {len(context)}")
            for b, c in enumerate(context):
                if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[1] != text_dim:
                    got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                    raise ValueError(f"context[{b}]: expected (L_b, text_dim={text_dim}), got {got}")
            ctx = torch.cat(list(context))
            ctx_seqs = PackedSeqs.from_grids([(1, 1, c.shape[0]) for c in context], device=ctx.device)
        if shard is not None:  # replicated on every rank: all-reduced gradient
            ctx = shard.replicate(ctx)
        return self.context_embedder(ctx), ctx_seqs

    def _check_honoured(self, seqs: PackedSeqs, y, context) -> None:
        """Refuse inputs this configuration would silently ignore: conditioning of the other kind, and
        (with checks on; the frame counts are host metadata of layouts built by ``pack``) videos given to
        an image model."""
        if self.cond == "class" and context is not None:
            raise ValueError("context: given, but this DiT is class-conditioned (cond='class'); pass labels y, "
                             "or build it with cond='text' and text_dim")
        if self.cond == "text" and y is not None:
            raise ValueError("y: given, but this DiT is text-conditioned (cond='text'); pass the text as context")
        if self.image_only and checks_enabled() and not torch.compiler.is_compiling():
            for b, (frames, _, _) in enumerate(seqs.grids):
                if frames > 1:
                    raise ValueError(f"seqs: sample {b} has T={frames} patch frames, but this DiT has the 2-D "
                                     f"patch_size {self.config.patch_size} of an image model, which embeds no "
                                     f"time; build it with patch_size=(pt, ph, pw) for videos")

    # ------------------------------------------------------------------ forwards
    def forward_packed(self, tokens: Tensor, seqs: PackedSeqs, t: Tensor, y: Tensor | None = None,
                       context=None) -> Tensor:
        """tokens (N, C*pt*ph*pw) from ``packdit.pack(latents, patch_size)``, t (B,) | (sum T_b,) | (N,),
        y (B,) labels or ``context`` (list of (L_b, text_dim), or packed ``(tokens, seqs)``)
        -> (N, pt*ph*pw*C_out), each token channels-last (``unpack(..., channels_last=True)``)."""
        validate_seqs(seqs)
        self._check_honoured(seqs, y, context)
        width = self.in_channels * math.prod(self.patch_size)
        if tokens.dim() != 2 or tokens.shape != (seqs.num_tokens, width):
            raise ValueError(f"tokens: expected ({seqs.num_tokens}, {width}) packed patches of seqs, "
                             f"got {tuple(tokens.shape)}")
        shard = None if self._sequence_parallel is None else self._sequence_parallel.shard(seqs)
        if torch.is_grad_enabled():
            self._track_gradient_reduction()
        if shard is not None:  # from here on this process runs its shard's tokens
            tokens = shard.scatter(tokens)
        x = self.x_embedder(tokens)
        if self.pos_embed_type != "rope3d":  # rope3d rotates q and k in each attention layer instead
            x = x + self._position_embedding(seqs, x.shape[-1], shard).to(x.dtype)
        ctx, ctx_seqs = self._pack_context(context, len(seqs), shard)
        c, mod_index = self._condition(t, y, seqs, ctx, ctx_seqs, shard)
        local = seqs if shard is None else shard.local
        for block in self.blocks:
            if self.checkpoint_activations and self.training:
                x = checkpoint(block, x, c, mod_index, local, ctx, ctx_seqs, shard, use_reentrant=False)
            else:
                x = block(x, c, mod_index, local, ctx, ctx_seqs, shard)
        out = self.final_layer(x, c, mod_index)
        return out if shard is None else shard.gather(out)

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
        return guide_first_channels(self.forward(cfg_batch(x), t, y), cfg_scale)


# ---------------------------------------------------------------------- registry
def _entry(config: DiTConfig) -> Callable[..., DiT]:
    def build(**overrides) -> DiT:
        return DiT(config, **overrides)

    build.__doc__ = f"DiT({config}); keyword arguments override its fields."
    return build


DiT_models: dict[str, Callable[..., DiT]] = {name: _entry(config) for name, config in DIT_CONFIGS.items()}
"""``DiT_models[name](**overrides)``: a DiT of the named configuration (:data:`DIT_CONFIGS`)."""
