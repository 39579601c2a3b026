"""Thin ``nn.Module`` wrappers over packdit's ops, operating on packed ``(N, D)`` tokens + ``PackedSeqs``.

Every module calls the dispatcher :mod:`packdit.nn.functional` (same op names and arguments), which picks
the kernel or the PyTorch reference per call; a module's ``backend`` (None: automatic) is passed through.
``PatchEmbed`` and ``TimestepEmbedder`` are the official DiT layers of :mod:`packdit.official`.
"""

from packdit.nn.attention import PackedAttention, PackedCrossAttention
from packdit.nn.mlp import FusedMLP
from packdit.nn.modulate import AdaLNModulation, GatedResidual, ModulatedNorm
from packdit.nn.pool import AttentionPool, segment_pool
from packdit.official import PatchEmbed, TimestepEmbedder

__all__ = ["PackedAttention", "PackedCrossAttention", "FusedMLP", "AdaLNModulation", "GatedResidual", "ModulatedNorm",
           "AttentionPool", "segment_pool", "PatchEmbed", "TimestepEmbedder"]
