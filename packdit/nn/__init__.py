"""Thin ``nn.Module`` wrappers over packdit's ops, operating on packed ``(N, D)`` tokens + ``PackedSeqs``."""

from packdit.nn.pool import AttentionPool, segment_pool
