"""Thin ``nn.Module`` wrappers over packdit's ops, operating on packed ``(N, D)`` tokens + ``PackedSeqs``.

The kernel-backed modules are imported on first use, so ``import packdit`` (and the torch backend of
``packdit.DiT``) works without importing triton.
"""

import importlib

from packdit.nn.pool import AttentionPool, segment_pool

_LAZY = {
    "PackedAttention": "packdit.nn.attention", "PackedCrossAttention": "packdit.nn.attention",
    "FusedMLP": "packdit.nn.mlp", "AdaLNModulation": "packdit.nn.modulate", "GatedResidual": "packdit.nn.modulate",
    "ModulatedNorm": "packdit.nn.modulate", "TimestepEmbedder": "packdit.nn.modulate",
    "PatchEmbed3D": "packdit.nn.patch",
}

__all__ = ["AttentionPool", "segment_pool", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packdit.nn' has no attribute {name!r}")
