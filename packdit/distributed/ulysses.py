"""Ulysses sequence parallelism over a packed batch (DeepSpeed-Ulysses, arXiv 2309.14509).

A group of P ranks runs one packed batch of N tokens together. Rank r holds the contiguous token shard
``[bounds[r], bounds[r+1])`` of :func:`shard_bounds` (uneven when P does not divide N) and runs every
token-local op on it: patch embedding, modulated norms, MLP, gated residuals, the final layer, with the
modulation rows gathered by the shard's own ``mod_index``. Only self-attention needs other ranks' tokens;
around it two all-to-alls trade the shard of every head for all tokens of H/P heads and back::

    q (n_r, Hq, d), k, v (n_r, Hk, d)          this rank's tokens, every head
       --all-to-all-->  q (N, Hq/P, d), k, v (N, Hk'/P, d)    every token, this rank's heads
       varlen_attention on the whole packed layout (full / spatial / temporal, RoPE from its positions)
       --all-to-all-->  out (n_r, Hq, d)

q, k and v travel in one exchange (one all-to-all, not three). Rank r takes query heads
``[r Hq/P, (r+1) Hq/P)``, so ``Hq % P == 0`` is required: uneven head shards would leave ranks idle for a
whole layer, and the planner's group sizes (powers of two) divide the usual head counts (16, 24). Key/value
heads (GQA, Hk < Hq) are first repeated ``f = P / gcd(Hk, P)`` times (kv head j -> f consecutive heads),
which makes ``Hk' = f Hk`` divisible by P and keeps every rank's query heads on their own kv heads:
``Hq % P == 0`` implies that f divides the group size ``Hq / Hk``. With ``Hk >= P`` and ``P | Hk`` nothing
is repeated; with ``Hk < P`` each rank receives one kv head (the replication of DeepSpeed-Ulysses).

Cross-attention to a per-sample text context needs no exchange: the context is replicated on every rank
and a query only attends to its own sample's context, so each rank runs it on its token shard with the
shard's layout (all heads, 1/P of the queries).

The shard of a packed batch is itself a packed layout (:func:`shard_layout`): every sample keeps its grid
and the tokens inside the shard (often none), with their true positions -- a layout with dropped tokens.
So every op, the per-frame modulation index and the position embeddings run on it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from datetime import timedelta
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import Tensor

from packdit.distributed.collectives import exchange_rows, gather_rows, replicate, scatter_rows
from packdit.layout import PackedSeqs

__all__ = ["shard_bounds", "shard_layout", "check_heads", "SequenceShard", "SequenceParallel",
           "sequence_parallel_groups"]


def shard_bounds(num_tokens: int, size: int) -> tuple[int, ...]:
    """Token offsets ``(size + 1,)`` of the contiguous shards of ``num_tokens`` over ``size`` ranks: rank r holds
    tokens ``[bounds[r], bounds[r+1])``; the first ``num_tokens % size`` ranks hold one token more (the split of
    ``torch.tensor_split``), so shards differ by at most one token and a rank holds none only if N < P."""
    if size < 1 or num_tokens < 0:
        raise ValueError(f"shard_bounds: expected num_tokens >= 0 and size >= 1, got {num_tokens}, {size}")
    base, extra = divmod(num_tokens, size)
    return tuple(r * base + min(r, extra) for r in range(size + 1))


def shard_layout(seqs: PackedSeqs, start: int, stop: int) -> PackedSeqs:
    """The layout of tokens ``[start, stop)`` of ``seqs``: the same B samples and grids, sample b cut to its tokens
    inside the range (possibly none), with their positions and segment ids; ``dropped`` when a sample holds fewer
    tokens than its grid. Host metadata only: no device->host copy beyond ``seqs.seqlens`` (cached per batch)."""
    if not 0 <= start <= stop <= seqs.num_tokens:
        raise ValueError(f"shard_layout: expected 0 <= start <= stop <= {seqs.num_tokens}, got [{start}, {stop})")
    offsets = [min(max(o, start), stop) - start for o in accumulate(seqs.seqlens, initial=0)]
    lengths = tuple(b - a for a, b in zip(offsets, offsets[1:]))
    grids = seqs.grids
    local = PackedSeqs(
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=seqs.device),
        max_seqlen=max(lengths, default=0),
        grid=seqs.grid,
        positions=seqs.positions[start:stop],
        segment_ids=seqs.segment_ids[start:stop],
        dropped=any(n < t * h * w for n, (t, h, w) in zip(lengths, grids)),
        sample_ndims=seqs.sample_ndims,
    )
    local._cache.update(seqlens=lengths, grids=grids, validated=True)
    return local


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceShard:
    """Rank ``rank``'s part of the packed batch ``seqs`` run by ``group``: tokens ``[start, stop)``, laid out by
    ``local``. Built per batch by :meth:`SequenceParallel.shard`; the exchanges below are differentiable and
    every rank of the group must call them in the same order."""

    group: dist.ProcessGroup
    rank: int
    bounds: tuple[int, ...]
    seqs: PackedSeqs
    local: PackedSeqs

    @property
    def size(self) -> int:
        return len(self.bounds) - 1

    @property
    def sizes(self) -> tuple[int, ...]:
        """Tokens of every rank's shard."""
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    def scatter(self, x: Tensor) -> Tensor:
        """``x (N, ...)``, the same on every rank -> this shard's rows ``(n_r, ...)`` (backward: all-gather)."""
        return scatter_rows(x, self.sizes, self.group)

    def gather(self, x: Tensor) -> Tensor:
        """This shard's rows ``(n_r, ...)`` -> ``(N, ...)`` on every rank (backward: own rows, see
        :mod:`packdit.distributed.collectives`)."""
        return gather_rows(x, self.sizes, self.group)

    def replicate(self, x: Tensor) -> Tensor:
        """``x`` (a replicated input such as the timesteps or the text context; backward: all-reduce)."""
        return replicate(x, self.group)

    def broadcast(self, x: Tensor) -> Tensor:
        """The group's first rank's ``x`` on every rank (not differentiable; for random draws such as label dropout
        that must agree across the group)."""
        x = x.clone()
        dist.broadcast(x, group=self.group, group_src=0)
        return x

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q (n_r, Hq, d)``, ``k, v (n_r, Hk, d)`` of this shard's tokens -> ``q (N, Hq/P, d)``, ``k, v (N, Hk'/P,
        d)`` of every token for this rank's heads (see the module docstring for Hk'); one all-to-all."""
        n, hq, d = q.shape
        hk, p = k.shape[1], self.size
        check_heads(hq, p)
        repeat = p // math.gcd(hk, p)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        hq_local, hk_local = hq // p, k.shape[1] // p
        # (P, n_r, heads of rank j, d): one copy, rank j's block contiguous for the exchange
        send = torch.cat([q.reshape(n, p, hq_local, d).transpose(0, 1), k.reshape(n, p, hk_local, d).transpose(0, 1),
                          v.reshape(n, p, hk_local, d).transpose(0, 1)], dim=2)
        heads = exchange_rows(send.view(p * n, hq_local + 2 * hk_local, d), [n] * p, self.sizes, self.group)
        q, k, v = heads.split([hq_local, hk_local, hk_local], dim=1)
        return q, k, v

    def to_tokens(self, out: Tensor) -> Tensor:
        """``out (N, Hq/P, d)`` of this rank's heads -> ``(n_r, Hq, d)`` of this shard's tokens; one all-to-all."""
        n, p = self.stop - self.start, self.size
        tokens = exchange_rows(out, self.sizes, [n] * p, self.group)        # (P * n_r, Hq/P, d), rank-major
        return tokens.view(p, n, *out.shape[1:]).transpose(0, 1).reshape(n, p * out.shape[1], out.shape[2])


def check_heads(num_heads: int, size: int) -> None:
    """ValueError unless ``num_heads`` query heads split evenly over a group of ``size`` ranks."""
    if num_heads % size:
        raise ValueError(f"sequence_parallel: {num_heads} attention heads cannot be split over a group of {size} "
                         f"ranks; Ulysses gives each rank num_heads / size heads, so the group size must divide "
                         f"num_heads")


class SequenceParallel:
    """A process group that runs each packed batch as one sequence, 1/P of its tokens per rank (see the module
    docstring). ``group``: a ``torch.distributed`` process group this process belongs to.

    Copies of a model share the group (``copy.deepcopy`` returns the same object): a process group is a handle
    to a communicator, not state.
    """

    def __init__(self, group: dist.ProcessGroup):
        if not dist.is_initialized():
            raise RuntimeError("sequence_parallel: torch.distributed is not initialized (init_process_group)")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"sequence_parallel: this process (global rank {dist.get_rank()}) is not a member of "
                             f"the group {dist.get_process_group_ranks(group)}")
        self.group, self.rank, self.size = group, rank, dist.get_world_size(group)

    def shard(self, seqs: PackedSeqs) -> SequenceShard:
        """This rank's :class:`SequenceShard` of the packed batch ``seqs`` (the same on every rank)."""
        bounds = shard_bounds(seqs.num_tokens, self.size)
        return SequenceShard(self.group, self.rank, bounds, seqs,
                             shard_layout(seqs, bounds[self.rank], bounds[self.rank + 1]))

    def __deepcopy__(self, memo) -> SequenceParallel:
        return self

    def __repr__(self) -> str:
        return f"SequenceParallel(ranks={dist.get_process_group_ranks(self.group)})"


def sequence_parallel_groups(sizes: Iterable[int], *, timeout: timedelta | None = None) -> dict[int, dist.ProcessGroup]:
    """This rank's process group of each size ``P > 1`` in ``sizes``: the aligned block of ranks
    ``[P * (rank // P), P * (rank // P) + P)``, the groups a sequence-parallel plan runs on (a group of size P
    starts at a multiple of P). Every group of every size is created here, once: every rank of the default group
    must call this with the same sizes (``torch.distributed.new_subgroups``; sizes of 1 alone need no process
    group and no initialized ``torch.distributed``). ``timeout``: the groups' collective timeout (None: torch's
    default for the backend, 30 min for gloo)."""
    sizes = sorted(set(int(p) for p in sizes))
    if sizes[-1:] in ([], [1]):  # nothing to create: no process group needed
        return {}
    world = dist.get_world_size()
    bad = [p for p in sizes if p < 1 or world % p]
    if bad:
        raise ValueError(f"sp_sizes: expected group sizes that divide the world size {world}, got {bad}")
    return {p: dist.new_subgroups(group_size=p, timeout=timeout)[0] for p in sizes if p > 1}

