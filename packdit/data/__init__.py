"""Data pipeline for packed training: per-rank batch sampler from the packing planner, packing collate."""

from packdit.data.sampler import PackedSampler, collate_packed

__all__ = ["PackedSampler", "collate_packed"]
