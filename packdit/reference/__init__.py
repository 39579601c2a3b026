"""Pure-PyTorch oracles: slow, obviously correct, no Triton. Every packdit kernel and module is tested against them.

    varlen_attention          per-sample attention over packed (N, heads, head_dim) tokens
                              (mode "full" / "spatial" / "temporal")
    RoPE3D, apply_rope_3d     3-D rotary position embedding of (t, h, w) positions
    DiT, DiT_models           the adaLN-Zero DiT (arXiv 2212.09748), checkpoint compatible with
                              facebookresearch/DiT, with a packed-batch forward
    get_2d_sincos_pos_embed   fixed 2-D sin-cos position embedding of (h, w) patch coordinates
    modulated_norm_reference, gated_residual_reference, mlp_reference
                              adaLN norm + modulate, gated residual, DiT MLP on packed tokens
    patchify_reference, unpatchify_reference
                              samples <-> packed tokens, one reshape + permute per sample
    layout_positions_reference, layout_reference
                              segment ids and (t, h, w) positions of a packed layout, token by token

A leaf of the package: it imports torch and packdit's plain value types and official layers
(:mod:`packdit.rope`, :mod:`packdit.layout`, :mod:`packdit.official`) only, never a kernel, and at run
time only the dispatcher (:mod:`packdit.nn.functional`) calls it.
"""

from packdit.official import get_2d_sincos_pos_embed
from packdit.reference.attention import varlen_attention
from packdit.reference.dit import DiT, DiT_models
from packdit.reference.layout import layout_positions_reference, layout_reference
from packdit.reference.mlp import mlp_reference
from packdit.reference.modulate import gated_residual_reference, modulated_norm_reference
from packdit.reference.patchify import patchify_reference, unpatchify_reference
from packdit.reference.rope import RoPE3D, apply_rope_3d, rope_angles

__all__ = ["varlen_attention", "RoPE3D", "apply_rope_3d", "rope_angles", "DiT", "DiT_models", "get_2d_sincos_pos_embed",
           "modulated_norm_reference", "gated_residual_reference", "mlp_reference", "patchify_reference",
           "unpatchify_reference", "layout_positions_reference", "layout_reference"]
