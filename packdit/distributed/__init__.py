"""Sequence parallelism for packed batches: a group of ranks runs one packed sequence, 1/P of its tokens each.

    SequenceParallel(group)       a process group running packed batches as one sequence (Ulysses attention)
    SequenceShard                 one rank's part of one batch: token range, its layout, the exchanges
    shard_bounds, shard_layout    the contiguous token split and the shard's packed layout
    sequence_parallel_groups      the aligned rank blocks of each group size, created once up front
    exchange_rows, gather_rows,   differentiable exchanges over a group (torch.distributed all-to-all and
    scatter_rows, replicate       all-reduce)

``packdit.DiT(..., sequence_parallel=group)`` uses it; :mod:`packdit.distributed.ulysses` explains the scheme.
"""

from packdit.distributed.collectives import exchange_rows, gather_rows, replicate, scatter_rows
from packdit.distributed.ulysses import (
    SequenceParallel,
    SequenceShard,
    check_heads,
    sequence_parallel_groups,
    shard_bounds,
    shard_layout,
)

__all__ = ["SequenceParallel", "SequenceShard", "check_heads", "shard_bounds", "shard_layout",
           "sequence_parallel_groups", "exchange_rows", "gather_rows", "scatter_rows", "replicate"]
