"""Patch embedding of packed tokens."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from packdit.layout import PatchSize, normalize_patch_size

__all__ = ["PatchEmbed3D"]


class PatchEmbed3D(nn.Module):
    """Packed patches (N, C*pt*ph*pw) -> (N, D) by ``proj = nn.Linear(C*pt*ph*pw, D)``.

    Tokens from :func:`packdit.pack` are ordered (C, pt, ph, pw), the flattening of a
    ``Conv3d(C, D, kernel_size=stride=(pt, ph, pw))`` weight, so this Linear equals the strided conv on
    every sample, whatever its size, without padding. :meth:`from_conv` copies a Conv2d/Conv3d, and a
    state_dict with a conv-shaped ``proj.weight`` (D, C, [pt,] ph, pw) (e.g. DiT's ``x_embedder``) loads
    directly.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: PatchSize = (1, 2, 2), bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = normalize_patch_size(patch_size)
        pt, ph, pw = self.patch_size
        self.proj = nn.Linear(in_channels * pt * ph * pw, hidden_size, bias=bias)
        self._register_load_state_dict_pre_hook(self._flatten_conv_weight)

    @staticmethod
    def _flatten_conv_weight(state_dict, prefix, *args) -> None:
        key = prefix + "proj.weight"
        if key in state_dict and state_dict[key].dim() > 2:
            state_dict[key] = state_dict[key].flatten(1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d | nn.Conv3d) -> PatchEmbed3D:
        """A PatchEmbed3D equal to ``conv`` (kernel size == stride, no padding/dilation/groups)."""
        if conv.stride != conv.kernel_size or any(conv.padding) or conv.groups != 1 or any(d != 1 for d in conv.dilation):
            raise ValueError(f"conv: expected a patch conv (stride == kernel_size, no padding, groups=1), got {conv}")
        kernel = tuple(conv.kernel_size)
        module = cls(conv.in_channels, conv.out_channels, kernel, bias=conv.bias is not None)
        module.to(device=conv.weight.device, dtype=conv.weight.dtype)
        module.load_state_dict({"proj." + k: v for k, v in conv.state_dict().items()})
        return module

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (N, C*pt*ph*pw) -> (N, D)."""
        return self.proj(tokens)
