"""The plain-PyTorch pieces of the official DiT (facebookresearch/DiT ``models.py``, Peebles & Xie,
arXiv 2212.09748) that :class:`packdit.DiT` and its oracle :class:`packdit.reference.DiT` are both built from.

None of them runs a packdit kernel -- they are O(B * D^2) conditioning layers, fixed tables and init
rules -- and they are checked against an independent transcription of the official code
(``tests/official_dit.py``), so sharing them costs the oracle no independence, while two copies would be
two places to fix. Submodule names, parameter shapes, initialisation and the order of random draws match
upstream, so the same seed gives the same weights and official checkpoints load with ``strict=True``.

Position embedding: the fixed 2-D sin-cos embedding of MAE/DiT, computed in float64. The token at patch
row h, column w gets ``concat(emb_1d(D/2, w), emb_1d(D/2, h))`` with
``emb_1d(D', pos) = concat(sin(pos * omega), cos(pos * omega))``, ``omega_i = 10000^(-i / (D'/2))``.
Computed from each token's (h, w), it serves images of any size and aspect; for the square
``input_size / p`` grid it is exactly the stored ``pos_embed`` table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from packdit._validate import checks_enabled

__all__ = ["MODEL_SIZES", "OFFICIAL_CONFIGS", "get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed",
           "grid_pos_embed", "check_loaded_pos_embed", "PatchEmbed", "TimestepEmbedder", "LabelEmbedder",
           "official_init", "check_timesteps", "cfg_batch", "guide_first_channels"]

MODEL_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
"""Official model sizes: name -> (depth, hidden_size, num_heads)."""

OFFICIAL_CONFIGS: dict[str, dict] = {
    f"DiT-{size}/{p}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
    for size, (depth, hidden, heads) in MODEL_SIZES.items() for p in (2, 4, 8)
}
"""The 12 official configurations "DiT-XL/2" ... "DiT-S/8": the constructor arguments that differ from the
defaults."""


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


def grid_pos_embed(embed_dim: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> Tensor:
    """(grid_h*grid_w, embed_dim) float64 embedding of a full grid in raster (row-major) order."""
    h = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    w = torch.arange(grid_w, device=device).repeat(grid_h)
    return get_2d_sincos_pos_embed(embed_dim, h, w)


def check_loaded_pos_embed(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs: list[str]) -> None:
    """``load_state_dict`` pre-hook of models that store the fixed ``pos_embed`` table for checkpoint
    compatibility but embed each token's (h, w) with :func:`get_2d_sincos_pos_embed`: a loaded table must
    be that fixed table (up to 2 ulp of its dtype; official checkpoints hold it in float32), or loading
    fails, strict or not -- a learned or interpolated table would otherwise be silently ignored.
    Register with ``module.register_load_state_dict_pre_hook(check_loaded_pos_embed)``."""
    loaded = state_dict.get(prefix + "pos_embed")
    if (not isinstance(loaded, Tensor) or loaded.shape != module.pos_embed.shape or loaded.is_meta
            or not loaded.is_floating_point()):
        return  # absent, or a shape/dtype load_state_dict itself reports
    fixed = grid_pos_embed(loaded.shape[-1], *module.x_embedder.grid_size, loaded.device)
    error = (loaded[0].double() - fixed).abs().max().item() if loaded.numel() else 0.0
    tolerance = 2 * torch.finfo(loaded.dtype).eps  # |table| <= 1, so rounding to the dtype moves it <= 1 ulp
    if error > tolerance:
        error_msgs.append(
            f"pos_embed: the loaded table differs from the fixed 2-D sin-cos table of the "
            f"{module.x_embedder.grid_size} patch grid by up to {error:.3g} (more than the {tolerance:.1g} rounding "
            f"of {loaded.dtype}); this model computes the sin-cos embedding from each token's (h, w), so a learned "
            f"or interpolated table cannot be used")


def check_timesteps(t) -> None:
    """ValueError naming ``t`` unless it is a 1-D real tensor (integer steps or fractional times)."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype == torch.bool or t.is_complex():
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else repr(t)
        raise ValueError(f"t: expected a 1-D tensor of timesteps (one per sample, frame or token), got {got}")


# ---------------------------------------------------------------------- layers
class PatchEmbed(nn.Module):
    """Non-overlapping patches -> D-vectors by a strided conv named ``proj`` (the timm layout of DiT's
    ``x_embedder``): ``Conv2d`` for 2-D patch sizes (``p`` or ``(ph, pw)``, the official checkpoint shape),
    ``Conv3d`` for spacetime patches ``(pt, ph, pw)``.

    ``forward(tokens)`` embeds packed tokens ``(N, C*pt*ph*pw)`` from :func:`packdit.pack`, whose vectors
    are ordered like the flattened conv weight, as one Linear: equal to the conv on every sample, whatever
    its size, without padding. :meth:`embed_images` is the conv itself on an image batch. ``grid_size``
    and ``num_patches`` describe the ``input_size`` square a stored ``pos_embed`` table is for.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int | Sequence[int] = 2, *,
                 bias: bool = True, input_size: int | None = None):
        super().__init__()
        kernel = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if len(kernel) not in (2, 3) or not all(isinstance(p, int) and p > 0 for p in kernel):
            raise ValueError(f"patch_size: expected a positive int, (ph, pw) or (pt, ph, pw), got {patch_size}")
        self.patch_size = kernel if len(kernel) == 3 else (1, *kernel)
        conv = nn.Conv2d if len(kernel) == 2 else nn.Conv3d
        self.proj = conv(in_channels, hidden_size, kernel_size=kernel, stride=kernel, bias=bias)
        if input_size is not None:
            self.grid_size = (input_size // self.patch_size[1], input_size // self.patch_size[2])
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d | nn.Conv3d) -> PatchEmbed:
        """A PatchEmbed with a copy of ``conv``'s weights (kernel size == stride, no padding, dilation or groups)."""
        if (conv.stride != conv.kernel_size or any(conv.padding) or conv.groups != 1
                or any(d != 1 for d in conv.dilation)):
            raise ValueError(f"conv: expected a patch conv (stride == kernel_size, no padding, groups=1), got {conv}")
        module = cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), bias=conv.bias is not None)
        module.to(device=conv.weight.device, dtype=conv.weight.dtype)
        module.proj.load_state_dict(conv.state_dict())
        return module

    def forward(self, tokens: Tensor) -> Tensor:
        """Packed tokens (N, C*pt*ph*pw) in conv-weight order -> (N, D)."""
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)

    def embed_images(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D), L = (H/ph)*(W/pw) in raster order (2-D patches only)."""
        return self.proj(x).flatten(2).transpose(1, 2)


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
        check_timesteps(t)
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
        if self.embedding_table.num_embeddings <= self.num_classes:
            raise ValueError(f"force_drop_ids / dropout_prob: dropping a label needs the null class "
                             f"{self.num_classes}, but the label table was built without its row "
                             f"(class_dropout_prob=0)")
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def check_labels(self, labels: Tensor) -> None:
        """ValueError naming ``y`` unless ``labels`` are int64/int32 rows of the table: ``[0, num_classes)``,
        plus the null class ``num_classes`` when the table has its row. The range costs one device->host
        copy, made only while ``packdit.checks`` is on (an out-of-range label on a GPU is a device-side
        assert that names nothing)."""
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
            got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"y: expected integer class labels (int64 or int32), got {got}")
        if not labels.numel() or not checks_enabled() or torch.compiler.is_compiling():
            return
        low, high = torch.stack([labels.min(), labels.max()]).tolist()
        rows = self.embedding_table.num_embeddings
        if low < 0 or high >= rows:
            null = (f"{self.num_classes} is the null class of classifier-free guidance" if rows > self.num_classes
                    else "no null class: class_dropout_prob=0")
            raise ValueError(f"y: expected class labels in [0, {rows - 1}] ({null}), got values from {low} to {high}")

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        self.check_labels(labels)
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------- init, guidance
def official_init(model: nn.Module) -> None:
    """The official DiT init, for any model with the official submodule names (``packdit.DiT`` too).

    Xavier-uniform Linears (zero bias), the sin-cos ``pos_embed`` table (models that store one), the patch
    conv xavier-uniform as the (D, C*prod(patch)) matrix with a zero bias (upstream since its "Fix patchify
    bias init"), N(0, 0.02) label table (if any) and timestep MLP weights, and zeros for every adaLN
    modulation Linear and the final Linear (adaLN-Zero). Same order of random draws as upstream, so the
    same seed gives the same weights.
    """

    def xavier_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(xavier_linear)
    if hasattr(model, "pos_embed"):
        table = grid_pos_embed(model.pos_embed.shape[-1], *model.x_embedder.grid_size, model.pos_embed.device)
        model.pos_embed.data.copy_(table.float().unsqueeze(0))
    conv_weight = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(conv_weight.view(conv_weight.shape[0], -1))
    if model.x_embedder.proj.bias is not None:
        nn.init.zeros_(model.x_embedder.proj.bias)
    if hasattr(model, "y_embedder"):
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for layer in [block.adaLN_modulation[-1] for block in model.blocks] + [
            model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def cfg_batch(x: Tensor) -> Tensor:
    """The batch ``forward_with_cfg`` runs: the first half of ``x`` (2B, ...) twice, once for the conditional
    labels and once for the null class (the official code reads only that half)."""
    if len(x) % 2:
        raise ValueError(f"x: forward_with_cfg expects an even batch, B conditional rows then their B "
                         f"unconditional copies, got {len(x)} rows")
    half = x[: len(x) // 2]
    return torch.cat([half, half], dim=0)


def guide_first_channels(model_out: Tensor, cfg_scale: float) -> Tensor:
    """The official CFG combination of ``model_out = [cond half; uncond half]`` (2B, C_out, ...).

    ``uncond + cfg_scale * (cond - uncond)`` on the first 3 channels, written to both halves; the other
    channels pass through. Upstream guides 3 channels "for exact reproducibility" of its samples (the
    standard choice would be all ``in_channels`` noise channels); kept for output parity.
    """
    if isinstance(cfg_scale, numbers.Real) and not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale: expected a finite number, got {cfg_scale!r}")  # NaN: every output NaN
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
