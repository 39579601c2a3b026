"""Pure-PyTorch oracles: slow, obviously correct, no Triton. Every packdit kernel and module is tested against them.

    varlen_attention          per-sample attention over packed (N, heads, head_dim) tokens
    DiT, DiT_models           the adaLN-Zero DiT (arXiv 2212.09748), checkpoint compatible with
                              facebookresearch/DiT, with a packed-batch forward
    get_2d_sincos_pos_embed   fixed 2-D sin-cos position embedding of (h, w) patch coordinates
"""

from packdit.reference.attention import varlen_attention
from packdit.reference.dit import DiT, DiT_models, get_2d_sincos_pos_embed

__all__ = ["varlen_attention", "DiT", "DiT_models", "get_2d_sincos_pos_embed"]
