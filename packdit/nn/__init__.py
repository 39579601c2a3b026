"""Thin ``nn.Module`` wrappers over packdit's ops, operating on packed ``(N, D)`` tokens + ``PackedSeqs``."""

from packdit.nn.attention import PackedAttention, PackedCrossAttention
from packdit.nn.mlp import FusedMLP
from packdit.nn.modulate import AdaLNModulation, GatedResidual, ModulatedNorm, TimestepEmbedder
from packdit.nn.patch import PatchEmbed3D
from packdit.nn.pool import AttentionPool, segment_pool
