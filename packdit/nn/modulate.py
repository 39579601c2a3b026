"""adaLN modules for packed tokens: the modulated norm, the gated residual, and the O(R) conditioning
path that produces their modulation rows."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from packdit.nn import functional as PF

__all__ = ["ModulatedNorm", "GatedResidual", "AdaLNModulation"]


class ModulatedNorm(nn.Module):
    """``norm(x) * (1 + scale[index]) + shift[index]`` (see :func:`packdit.nn.functional.modulated_norm`).

    ``norm_type``: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm); ``elementwise_affine`` adds ``weight``
    (ones) and ``bias`` (zeros, LayerNorm only) of shape (D,); DiT uses neither (eps 1e-6).
    ``backend``: see :mod:`packdit.nn.functional` (None: chosen per call).
    """

    def __init__(self, hidden_size: int, norm_type: str = "layer", eps: float = 1e-6,
                 elementwise_affine: bool = False, *, backend: str | None = None):
        super().__init__()
        if norm_type not in ("layer", "rms"):
            raise ValueError(f"norm_type: expected 'layer' or 'rms', got {norm_type!r}")
        self.hidden_size, self.norm_type, self.eps = hidden_size, norm_type, eps
        self.backend = PF.check_backend(backend, "modulated_norm")
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if elementwise_affine and norm_type == "layer" else None

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor, index: Tensor) -> Tensor:
        """x (N, D), shift/scale (R, D), index (N,) int32 -> (N, D)."""
        return PF.modulated_norm(x, shift, scale, index, self.weight, self.bias, self.eps, self.norm_type,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, norm_type={self.norm_type!r}, eps={self.eps}, affine={self.weight is not None}"


class GatedResidual(nn.Module):
    """``x + gate[index] * f`` (see :func:`packdit.nn.functional.gated_residual`); no parameters."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = PF.check_backend(backend, "gated_residual")

    def forward(self, x: Tensor, f: Tensor, gate: Tensor, index: Tensor) -> Tensor:
        """x, f (N, D), gate (R, D), index (N,) int32 -> (N, D)."""
        return PF.gated_residual(x, f, gate, index, backend=self.backend)


class AdaLNModulation(nn.Sequential):
    """``SiLU -> Linear(D, k*D)`` on the conditioning c (R, D) -> k modulation tables (R, D).

    R is the number of samples (or frames, for per-frame timesteps), not tokens: this stays in PyTorch
    because it is O(R*D^2), negligible next to the O(N) token ops, and its output chunks are strided
    views passed to the kernels without a copy (their row stride is free). Same layout as DiT's
    ``adaLN_modulation`` (keys ``1.weight``, ``1.bias``), zero-initialised (adaLN-Zero).
    """

    def __init__(self, hidden_size: int, num_chunks: int = 6):
        super().__init__(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size, bias=True))
        self.num_chunks = num_chunks
        nn.init.zeros_(self[1].weight)
        nn.init.zeros_(self[1].bias)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        """c (R, D) -> ``num_chunks`` views (R, D), e.g. shift1, scale1, gate1, shift2, scale2, gate2."""
        return super().forward(c).chunk(self.num_chunks, dim=-1)
