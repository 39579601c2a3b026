"""Pure-PyTorch oracle of the DiT MLP with an optional adaLN-Zero gated residual."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from packdit.reference.modulate import gated_residual_reference

__all__ = ["mlp_reference"]


def mlp_reference(
    h: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    x: Tensor | None = None,
    gate: Tensor | None = None,
    index: Tensor | None = None,
) -> Tensor:
    """``f = fc2(gelu_tanh(fc1(h)))``; returns f, or ``x + gate[index] * f`` when x, gate, index are given.

    h (N, D_in), fc1_weight (H, D_in), fc1_bias (H,), fc2_weight (D_out, H), fc2_bias (D_out,),
    x (N, D_out), gate (R, D_out), index (N,) int -> (N, D_out).
    """
    f = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate="tanh"), fc2_weight, fc2_bias)
    return f if x is None else gated_residual_reference(x, f, gate, index)
