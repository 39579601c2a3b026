"""Pure-PyTorch oracles of the adaLN ops on packed tokens.

Every token i of a packed batch reads row ``index[i]`` of a per-sample (or per-frame) modulation table:
``index = seqs.segment_ids`` for one row per sample, or a per-token ``mod_index`` for per-frame timesteps.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["modulated_norm_reference", "gated_residual_reference"]


def modulated_norm_reference(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    index: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm_type: str = "layer",
) -> Tensor:
    """``norm(x) * (1 + scale[index]) + shift[index]``; x (N, D), shift/scale (R, D), index (N,) -> (N, D).

    ``norm`` is LayerNorm (``norm_type="layer"``) or RMSNorm (``"rms"``) over D with optional affine
    ``weight``/``bias`` (D,), computed in x's dtype by torch.
    """
    if norm_type == "layer":
        z = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    elif norm_type == "rms":
        z = F.rms_norm(x, (x.shape[-1],), weight, eps)
        if bias is not None:
            z = z + bias
    else:
        raise ValueError(f"norm_type: expected 'layer' or 'rms', got {norm_type!r}")
    rows = index.long()
    return z * (1 + scale[rows]) + shift[rows]


def gated_residual_reference(x: Tensor, f: Tensor, gate: Tensor, index: Tensor) -> Tensor:
    """``x + gate[index] * f``; x, f (N, D), gate (R, D), index (N,) -> (N, D)."""
    return x + gate[index.long()] * f
