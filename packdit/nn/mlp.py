"""The DiT MLP on packed tokens with fused GEMM epilogues."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from packdit.nn import functional as PF

__all__ = ["FusedMLP"]


class FusedMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(h)))``, optionally as the gated residual ``x + gate[index] * fc2(...)``.

    ``fc1`` (D_in -> hidden) and ``fc2`` (hidden -> D_out) are ``nn.Linear`` with DiT's names, so a DiT
    ``Mlp`` state_dict loads unchanged. See :func:`packdit.nn.functional.fused_mlp` (``backend``: None
    chooses per call).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
                 *, backend: str | None = None):
        super().__init__()
        self.backend = PF.check_backend(backend, "fused_mlp")
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, h: Tensor, x: Tensor | None = None, gate: Tensor | None = None,
                index: Tensor | None = None) -> Tensor:
        """h (N, D_in) -> (N, D_out); with x (N, D_out), gate (R, D_out), index (N,) int32 the gated residual."""
        return PF.fused_mlp(h, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, x, gate, index,
                            backend=self.backend)
