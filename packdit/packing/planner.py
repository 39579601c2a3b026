"""Load-balanced packing planner: which samples every group of ranks trains on at every step.

A data-parallel step runs ``ranks`` GPUs at once and lasts as long as the slowest one, so the planner
balances *cost* (not tokens) across the GPUs of a step, under a token cap per GPU (``capacity``).

Sequence parallelism (``sp_sizes``, default ``(1,)``: none). A pack may be run by a group of P ranks, P one
of ``sp_sizes``: each of its ranks holds 1/P of the pack's tokens (Ulysses attention over the whole pack),
so the pack holds up to ``P * capacity`` tokens and each rank of the group carries ``cost(pack) / P`` plus
its share of the all-to-alls (``(sum cost(L_i) + alltoall * N) / P`` for N tokens, see
:mod:`packdit.packing.cost`). A sample of L tokens has the *size class* of the smallest P in ``sp_sizes``
with ``L <= P * capacity``: 1 for every sample that fits one rank, so nothing changes for them, and no
sample longer than ``capacity`` is dropped as long as the largest group holds it. A sample longer than
``max(sp_sizes) * capacity`` raises ValueError naming it and the group size it needs, or, with
``split_long=True``, is left out of the steps and listed in ``Plan.long_samples`` (with the default
``sp_sizes=(1,)``: every sample longer than ``capacity``, as without sequence parallelism).

``sp_sizes`` must contain 1, and each size must divide the next and the largest one ``ranks`` (e.g.
``(1, 2, 4, 8)``). Guarantee: every group of a plan is an *aligned block* of ranks: a group of size P runs
on ranks ``first_rank .. first_rank + P - 1`` with ``first_rank % P == 0``. So all groups any plan can use
are the ``ranks / P`` blocks of each size P > 1 (:func:`group_blocks`, at most ``sum_P ranks / P`` of
them): a trainer creates their process groups once, up front, and a group whose size divides the GPUs
per node (e.g. up to 8 of 8) never spans two nodes.

Algorithm (``plan_steps``), window after window of the sample stream. A sample's *footprint* is the room it
claims: its length for size class 1, ``P * capacity`` (its whole group) for size class P > 1.

1. Chunk: the samples carried over from the previous window, then samples in stream order while the
   chunk's footprint is at most ``window * ranks * capacity`` tokens. If the rest of the stream has a
   smaller footprint than that, the chunk takes it all: the last window spans up to ``2 * window`` steps
   instead of leaving a short final window (a window of 1-2 steps balances like ``window=1``).
2. Bins (a bin is one pack and the group of ranks that runs it): one empty bin of size P for every sample
   of size class P > 1 in the chunk, and unit bins (size 1) for the rest of
   ``S * ranks`` ranks, ``S = max(1, ceil(chunk_footprint / (ranks * capacity)))`` (S <= window except in
   the last window). A bin's *load* is what each of its ranks carries.
3. LPT (longest processing time first) under the token cap: samples sorted by (size class descending,
   carried first, cost descending, tie key ascending, index ascending). A sample of size class P > 1 goes
   on the least (load, bin id) bin of size P with room for it (at least its length of free tokens): so
   it runs on the smallest group that holds it, and always finds one (the bins of size P are as many as
   its samples, which come first). A sample of size class 1 goes where it finishes first: of every size,
   the least (load, bin id) bin with room, then the least ``load + share`` (its cost on a unit bin,
   ``(cost + alltoall) / P`` on a bin of P > 1 ranks; ties: the smaller size), so short samples fill a
   group's spare room when that balances best. A sample that fits no bin is carried to the next window
   if it was not carried before and the stream is not exhausted; otherwise one more step is opened (a
   unit bin for it and ``ranks - 1`` more). So a sample is delayed by at most one window and none is
   dropped.
4. Steps: bins merged level by level, from the smallest size up: the unit bins sorted by (load
   descending, bin id) are cut into consecutive groups of ``sp_sizes[1]`` (``ranks`` without sequence
   parallelism); these groups and the bins of size ``sp_sizes[1]``, sorted the same way (a group's load
   and id are its first, i.e. most loaded, member's), are cut into groups of ``sp_sizes[2] / sp_sizes[1]``,
   and so on up to ``ranks``; each top-level group is one step, its bins in rank order. So every step
   holds bins of similar load, and every bin sits in an aligned block of its size. Bins of the last window
   (or of an opened step) may be empty: such a step has ranks with no sample (their list is empty).

With ``sp_sizes=(1,)`` this is the lookahead LPT planner over single-rank packs, plan for plan.
The tie key of sample i is ``splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15)``, so the plan is a
deterministic function of (lengths, costs, all-to-all costs, capacity, ranks, window, sp_sizes, seed). The
C++ implementation (``packdit._C.plan_lookahead``) and :func:`_plan_python` give identical plans; the
latter runs when the native extension is not available.

Statistics (:class:`PlanStats`), for a plan of S steps, with ``cost_{s,g}`` the cost GPU g carries at step
s (a bin's cost divided by its size; padded cost for padding baselines) and ``useful`` the sum of the
planned samples' own costs (all-to-all time is not useful work):

* balance efficiency ``E = useful / (ranks * sum_s max_g cost_{s,g})``, over GPUs: the fraction of the
  GPUs' time spent on useful work when every step waits for its slowest GPU (1 = perfect);
* padding to capacity ``1 - tokens / (S * ranks * capacity)``: the fraction of padding tokens if every
  GPU's share were padded to ``capacity`` (fixed-shape buffers); padding to the step max ``1 - tokens /
  sum_s ranks * max_g tokens_{s,g}`` pads each GPU's share to the step's largest one;
* max reorder distance ``max_{i before j in the stream} step(i) - step(j)``: how many steps a sample
  runs after one that followed it in the stream (0 for an in-order plan). The planner keeps it about
  below ``3 * window``: a window's samples run in its own steps, a carried sample in the next window's,
  and the last window spans up to ``2 * window`` steps;
* sequence parallelism: the samples (and tokens) run by groups of more than one rank, those of them
  longer than ``capacity``, and the all-to-all share of the GPUs' work.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import numbers
from typing import NamedTuple

import numpy as np

from packdit import _ext
from packdit.packing.cost import resolve_alltoall_costs, resolve_costs

__all__ = ["Plan", "PlanStats", "Group", "plan_steps", "group_blocks", "as_sp_sizes", "prepare_samples", "as_lengths",
           "positive_int", "is_integer", "tie_keys", "implementation"]

_GOLDEN = 0x9E3779B97F4A7C15


def tie_keys(num_samples: int, seed: int) -> np.ndarray:
    """``(num_samples,)`` uint64: ``splitmix64(seed + (i + 1) * golden)`` for sample i (tie-breaking only)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (np.arange(1, num_samples + 1, dtype=np.uint64) * np.uint64(_GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Group(NamedTuple):
    """One pack of a step and the ranks that run it: ranks ``first_rank .. first_rank + size - 1``, an aligned
    block (``first_rank % size == 0``). Every rank of the group runs the same ``indices`` (the pack's samples,
    empty for idle ranks); with ``size > 1`` each of them holds 1/size of the pack's tokens (sequence
    parallelism)."""

    first_rank: int
    size: int
    indices: list[int]

    @property
    def ranks(self) -> range:
        """The group's ranks, ascending."""
        return range(self.first_rank, self.first_rank + self.size)


@dataclasses.dataclass(frozen=True, eq=False)
class PlanStats:
    """Summary of a plan; see the module docstring for the definitions."""

    num_steps: int
    num_samples: int          # samples in the steps
    num_long_samples: int     # samples left out of the steps (Plan.long_samples)
    long_tokens: int          # their tokens
    num_sp_samples: int       # samples run by groups of more than one rank
    num_sp_long_samples: int  # those of them longer than capacity (the ones that need a group)
    sp_tokens: int            # tokens run by groups of more than one rank
    alltoall_fraction: float  # the all-to-all share of the work of all GPUs (sum of bin costs)
    balance_efficiency: float
    padding_to_capacity: float
    padding_to_step_max: float
    max_reorder_distance: int
    step_max_cost: np.ndarray   # (num_steps,) max over GPUs of the cost each GPU carries
    step_mean_cost: np.ndarray  # (num_steps,) mean over GPUs

    def row(self) -> dict:
        """The scalar statistics as a flat dict (for tables)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("step_")}


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Packs per (step, group of ranks), stored flat.

    ``order`` (M,) int64 holds sample indices grouped by bin: bin k (one pack and the group of ranks that
    runs it) holds ``order[bin_offsets[k]:bin_offsets[k+1]]`` and is run by ``bin_sizes[k]`` ranks. Bins are
    listed step by step, each step's bins in rank order, so the running sum of ``bin_sizes`` places them:
    bin k runs on ranks ``bin_first_rank[k] .. bin_first_rank[k] + bin_sizes[k] - 1`` at step
    ``bin_step[k]``. Without sequence parallelism every size is 1 and bin ``k = step * ranks + rank``.
    Checked at construction: every size is one of ``sp_sizes``, the bins of every step tile its ``ranks``
    ranks, and every group is an aligned block (``bin_first_rank % bin_sizes == 0``).

    ``bin_tokens`` / ``bin_costs`` (num_bins,) are each pack's tokens and cost, its group's ranks together
    (padded values for padding baselines; a group of P > 1 ranks adds its samples' all-to-all costs); each
    rank of the group carries 1/P of both. ``lengths`` / ``costs`` / ``alltoall_costs`` (num_samples,) are
    every input sample's own tokens, cost and all-to-all cost. ``long_samples`` are the samples left out of
    the steps as too long for the largest group (``split_long=True``; without sequence parallelism: longer
    than ``capacity``).
    """

    order: np.ndarray
    bin_offsets: np.ndarray
    ranks: int
    capacity: int
    lengths: np.ndarray
    costs: np.ndarray
    bin_tokens: np.ndarray
    bin_costs: np.ndarray
    long_samples: tuple[int, ...] = ()
    bin_sizes: np.ndarray | None = None       # None: every bin is run by one rank
    sp_sizes: tuple[int, ...] = (1,)
    alltoall_costs: np.ndarray | None = None  # None: zeros

    def __post_init__(self):
        num_bins = len(self.bin_offsets) - 1
        sizes = np.ones(num_bins, np.int64) if self.bin_sizes is None else np.asarray(self.bin_sizes, np.int64)
        alltoall = (np.zeros(len(self.lengths)) if self.alltoall_costs is None
                    else np.asarray(self.alltoall_costs, np.float64))
        sp_sizes = as_sp_sizes(self.sp_sizes, self.ranks)
        object.__setattr__(self, "bin_sizes", sizes)
        object.__setattr__(self, "alltoall_costs", alltoall)
        object.__setattr__(self, "sp_sizes", sp_sizes)
        if sizes.shape != (num_bins,):
            raise ValueError(f"bin_sizes: expected {num_bins} sizes (one per bin), got shape {sizes.shape}")
        bad = np.flatnonzero(~np.isin(sizes, sp_sizes))
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"bin_sizes: bin {k} is run by {sizes[k]} ranks, not one of sp_sizes={sp_sizes}")
        total = int(sizes.sum())
        if total % self.ranks:
            raise ValueError(f"bin_sizes: the {num_bins} bins are run by {total} ranks in all, not a whole number "
                             f"of steps of ranks={self.ranks}")
        first = self.bin_first_rank
        bad = np.flatnonzero(first % sizes != 0)  # sizes divide ranks: an aligned group ends within its step
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"bin_sizes: bin {k} of {sizes[k]} ranks starts at rank {first[k]} of its step: a "
                             "group must be an aligned block of ranks within its step")

    @classmethod
    def from_bins(cls, order, bin_offsets, *, ranks, capacity, lengths, costs, long_samples=(),
                  bin_tokens=None, bin_costs=None, bin_sizes=None, sp_sizes=(1,), alltoall_costs=None) -> Plan:
        """Plan of packed bins; ``bin_tokens`` / ``bin_costs`` default to the sums over each bin's samples (and
        over their all-to-all costs on bins of more than one rank), ``bin_sizes`` to ones."""
        order = np.asarray(order, dtype=np.int64)
        bin_offsets = np.asarray(bin_offsets, dtype=np.int64)
        sizes = np.ones(len(bin_offsets) - 1, np.int64) if bin_sizes is None else np.asarray(bin_sizes, np.int64)
        if bin_tokens is None:
            bin_tokens = _segment_sums(lengths[order], bin_offsets)
        if bin_costs is None:
            bin_costs = _segment_sums(costs[order], bin_offsets)
            if alltoall_costs is not None and (sizes > 1).any():
                bin_costs += np.where(sizes > 1, _segment_sums(np.asarray(alltoall_costs)[order], bin_offsets), 0.0)
        return cls(order, bin_offsets, ranks, capacity, lengths, costs, np.asarray(bin_tokens, np.float64),
                   np.asarray(bin_costs, np.float64), tuple(int(i) for i in long_samples), sizes, sp_sizes,
                   alltoall_costs)

    @property
    def num_steps(self) -> int:
        return int(self.bin_sizes.sum()) // self.ranks

    @functools.cached_property
    def _bin_starts(self) -> np.ndarray:
        """(num_bins,) int64: the bins' first ranks counted over all steps (step * ranks + first rank)."""
        return np.cumsum(self.bin_sizes) - self.bin_sizes

    @property
    def bin_first_rank(self) -> np.ndarray:
        """(num_bins,) int64: the first rank of each bin's group."""
        return self._bin_starts % self.ranks

    @property
    def bin_step(self) -> np.ndarray:
        """(num_bins,) int64: the step of each bin."""
        return self._bin_starts // self.ranks

    def _check_rank(self, rank: int) -> None:
        if not is_integer(rank) or not 0 <= rank < self.ranks:
            raise ValueError(f"rank: expected an int with 0 <= rank < {self.ranks}, got {rank!r}")

    def rank_groups(self, rank: int) -> list[Group]:
        """The group that holds rank ``rank`` at every step, with its pack's sample indices."""
        self._check_rank(rank)
        first, sizes = self.bin_first_rank, self.bin_sizes
        bins = np.flatnonzero((first <= rank) & (rank < first + sizes))  # one per step, in step order
        return [Group(f, p, self.order[s:e].tolist()) for f, p, s, e in
                zip(first[bins].tolist(), sizes[bins].tolist(), self.bin_offsets[bins].tolist(),
                    self.bin_offsets[bins + 1].tolist())]

    def rank_batches(self, rank: int) -> list[list[int]]:
        """Rank ``rank``'s sample indices at every step: its group's pack (the same on every rank of the group)."""
        return [group.indices for group in self.rank_groups(rank)]

    @functools.cached_property
    def groups(self) -> list[list[Group]]:
        """``groups[s]``: the groups of step s in rank order (their ranks tile ``0 .. ranks - 1``)."""
        packs = np.split(self.order, self.bin_offsets[1:-1]) if len(self.bin_offsets) > 1 else []
        steps: list[list[Group]] = [[] for _ in range(self.num_steps)]
        for step, first, size, pack in zip(self.bin_step.tolist(), self.bin_first_rank.tolist(),
                                           self.bin_sizes.tolist(), packs):
            steps[step].append(Group(first, size, pack.tolist()))
        return steps

    @functools.cached_property
    def steps(self) -> list[list[list[int]]]:
        """``steps[s][r]``: sample indices rank r trains on at step s, its group's pack (equal lists on every
        rank of a group; an empty list for an idle rank)."""
        return [[list(group.indices) for group in step for _ in group.ranks] for step in self.groups]

    @functools.cached_property
    def stats(self) -> PlanStats:
        R, S = self.ranks, self.num_steps
        planned = np.ones(len(self.lengths), dtype=bool)
        planned[list(self.long_samples)] = False
        tokens = float(self.lengths[planned].sum())
        useful = float(self.costs[planned].sum())
        sizes = self.bin_sizes
        gpu_costs = np.repeat(self.bin_costs / sizes, sizes).reshape(S, R)
        gpu_tokens = np.repeat(self.bin_tokens / sizes, sizes).reshape(S, R)
        step_max = gpu_costs.max(axis=1) if S else np.zeros(0)
        busy = R * float(step_max.sum())
        padded_step_max = R * float(gpu_tokens.max(axis=1).sum()) if S else 0.0
        in_groups = self.order[np.repeat(sizes > 1, np.diff(self.bin_offsets))]
        work = float(self.bin_costs.sum())
        return PlanStats(
            num_steps=S,
            num_samples=int(planned.sum()),
            num_long_samples=len(self.long_samples),
            long_tokens=int(self.lengths[~planned].sum()),
            num_sp_samples=len(in_groups),
            num_sp_long_samples=int((self.lengths[in_groups] > self.capacity).sum()),
            sp_tokens=int(self.lengths[in_groups].sum()),
            alltoall_fraction=float(self.alltoall_costs[in_groups].sum()) / work if work > 0 else 0.0,
            balance_efficiency=useful / busy if busy > 0 else 1.0,
            padding_to_capacity=1.0 - tokens / (S * R * self.capacity) if S else 0.0,
            padding_to_step_max=1.0 - tokens / padded_step_max if padded_step_max > 0 else 0.0,
            max_reorder_distance=self._max_reorder_distance(planned),
            step_max_cost=step_max,
            step_mean_cost=gpu_costs.mean(axis=1) if S else np.zeros(0),
        )

    def _max_reorder_distance(self, planned: np.ndarray) -> int:
        if not len(self.order):
            return 0
        step_of_sample = np.empty(len(self.lengths), dtype=np.int64)
        step_of_sample[self.order] = np.repeat(self.bin_step, np.diff(self.bin_offsets))
        steps = step_of_sample[np.flatnonzero(planned)]
        earliest_after = np.minimum.accumulate(steps[::-1])[::-1]  # min step over the sample and later ones
        return int((steps - earliest_after).max())


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return sums[offsets[1:]] - sums[offsets[:-1]]


def implementation() -> str:
    """``"cpp"`` when ``plan_steps`` runs the native planner, else ``"python"``."""
    return "cpp" if hasattr(_ext.load(), "plan_lookahead") else "python"


def is_integer(value) -> bool:
    """An int, a numpy integer or an integral float (not a bool, not NaN/inf)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()


def positive_int(value, name: str) -> int:
    """``value`` as an int, or ValueError naming ``name`` unless it is an integer >= 1."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def as_lengths(lengths, name: str = "lengths") -> np.ndarray:
    """``(n,)`` int64 token counts from a 1-D sequence / array / tensor of non-negative integers.

    Integral floats are accepted; a fractional, NaN or infinite count, a bool or non-numeric dtype, an
    array of another rank or a negative count raises ValueError naming the sample, instead of being
    truncated or flattened.
    """
    try:
        array = np.asarray(lengths)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name}: expected a 1-D sequence of token counts: {exc}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token counts, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name}: expected integer token counts, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(array) | (array != np.round(array)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}: expected integer token counts, got {array[i]} for sample {i} "
                             f"({bad.size} such samples)")
    if array.min() < 0:
        i = int(np.argmin(array))
        raise ValueError(f"{name}: sample {i} has negative length {array[i]}")
    return array.astype(np.int64)



def as_sp_sizes(sp_sizes, ranks: int) -> tuple[int, ...]:
    """``sp_sizes`` as an ascending tuple of distinct ints, or ValueError unless it holds 1 and each size divides
    the next one and ``ranks`` (what lets groups of mixed sizes tile every step in aligned blocks)."""
    try:
        values = list(sp_sizes)
    except TypeError:
        values = None
    if not values or not all(is_integer(v) and v >= 1 for v in values):
        raise ValueError(f"sp_sizes: expected a sequence of group sizes (positive ints) such as (1, 2, 4, 8), got "
                         f"{sp_sizes!r}")
    sizes = sorted({int(v) for v in values})
    if sizes[0] != 1:
        raise ValueError(f"sp_sizes: expected 1 among the sizes (a sample that fits one rank runs on one rank), got "
                         f"{sp_sizes!r}")
    for size, larger in zip(sizes, sizes[1:] + [ranks]):
        if larger % size:
            of = f"ranks={ranks}" if larger == ranks and size == sizes[-1] else f"the next size {larger}"
            raise ValueError(f"sp_sizes: {size} does not divide {of}: each size must divide the next one and the "
                             f"largest one ranks, so that groups of mixed sizes tile every step; got {sp_sizes!r}")
    return tuple(sizes)


def group_blocks(ranks: int, sp_sizes) -> list[tuple[int, int]]:
    """``(first_rank, size)`` of every group of more than one rank a plan of ``ranks`` ranks and ``sp_sizes`` can
    use: the aligned blocks ``first_rank = 0, size, 2 * size, ...`` of each size > 1, by size then first rank
    (``sum_P ranks / P`` of them). A trainer creates their process groups once, in this order on every rank."""
    ranks = positive_int(ranks, "ranks")
    return [(first, size) for size in as_sp_sizes(sp_sizes, ranks)[1:] for first in range(0, ranks, size)]


def prepare_samples(lengths, *, capacity, ranks, window=1, cost=None, hidden_size=None, split_long=False,
                    sp_sizes=(1,)):
    """Validate planner inputs; return ``(lengths int64, costs float64, planned, too_long)``, the last two
    the indices of the samples that the largest group of ``sp_sizes`` holds (``max(sp_sizes) * capacity``
    tokens) and of those it does not (ValueError for the latter unless ``split_long``)."""
    capacity, ranks, window = (positive_int(v, name) for v, name in
                               ((capacity, "capacity"), (ranks, "ranks"), (window, "window")))
    if window * ranks * capacity >= 2**62:
        raise ValueError(f"window * ranks * capacity = {window * ranks * capacity} tokens must stay below 2**62")
    largest = as_sp_sizes(sp_sizes, ranks)[-1]
    lengths = as_lengths(lengths)
    costs = resolve_costs(lengths, cost, hidden_size)
    held = largest * capacity
    too_long = np.flatnonzero(lengths > held)
    if too_long.size and not split_long:
        i = int(too_long[0])
        length = int(lengths[i])
        most = (f"capacity={capacity} tokens per rank" if largest == 1 else
                f"the largest sequence-parallel group holds ({largest} ranks x capacity={capacity} = {held} tokens)")
        raise ValueError(
            f"sample {i} has {length} tokens, more than {most} ({too_long.size} such samples): it needs a group of "
            f"at least {-(-length // capacity)} ranks: pass sp_sizes with such a size (sequence parallelism), raise "
            "capacity, or pass split_long=True to list such samples in Plan.long_samples"
        )
    planned = np.flatnonzero(lengths <= held)
    footprint = np.where(lengths <= capacity, lengths, held)[planned]  # no less than the room each claims
    if float(footprint.sum(dtype=np.float64)) >= 2**62:
        raise ValueError("lengths: the samples claim 2**62 tokens or more; the planner counts tokens in int64")
    return lengths, costs, planned, too_long


def plan_steps(
    lengths,
    *,
    capacity: int,
    ranks: int,
    hidden_size: int | None = None,
    window: int = 16,
    cost=None,
    seed: int = 0,
    split_long: bool = False,
    sp_sizes=(1,),
    backend: str | None = None,
) -> Plan:
    """Plan training steps for samples of ``lengths`` tokens on ``ranks`` ranks (GPUs).

    Args:
        lengths: token count of every sample, in stream order (a sequence or 1-D int array).
        capacity: max tokens per rank per step (a group of P ranks holds up to ``P * capacity``).
        ranks: ranks (GPUs) of a step: data-parallel ranks, or groups of them with ``sp_sizes``.
        hidden_size: model width for the default cost ``6*hidden_size*L + L**2`` and all-to-all cost
            (:meth:`CostModel.flops`).
        window: lookahead in steps (1 = balance each step on its own).
        cost: a :class:`CostModel` or a vectorized callable ``lengths array -> costs``; overrides hidden_size.
            The all-to-all cost of sequence parallelism is ``cost.alltoall_costs(lengths)`` when ``cost`` has
            that method (a CostModel does), else 0.
        seed: tie-breaking seed.
        split_long: list samples too long for the largest group (longer than ``max(sp_sizes) * capacity``
            tokens; with the default ``sp_sizes``, longer than ``capacity``) in ``Plan.long_samples`` and leave
            them out of the steps, instead of raising ValueError.
        sp_sizes: the sizes of the groups of ranks that may run one pack together (sequence parallelism),
            e.g. ``(1, 2, 4, 8)``: 1 included, each size dividing the next and the largest dividing ``ranks``.
            A sample longer than ``capacity`` runs on the smallest group that holds it. The default ``(1,)``
            plans every pack on one rank, exactly as without sequence parallelism.
        backend: ``"cpp"`` or ``"python"`` to force an implementation (default: C++ when available).

    Returns a :class:`Plan`; see the module docstring for the algorithm and guarantees.
    """
    if not is_integer(seed):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    seed = int(seed)
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, window=window,
                                                        cost=cost, hidden_size=hidden_size, split_long=split_long,
                                                        sp_sizes=sp_sizes)
    sp_sizes = as_sp_sizes(sp_sizes, int(ranks))
    alltoall = resolve_alltoall_costs(lengths, cost, hidden_size)
    backend = backend or implementation()
    if backend not in ("cpp", "python"):
        raise ValueError(f"backend: expected 'cpp' or 'python', got {backend!r}")
    sub_lengths = np.ascontiguousarray(lengths[planned])
    sub_costs = np.ascontiguousarray(costs[planned])
    sub_alltoall = np.ascontiguousarray(alltoall[planned])
    keys = tie_keys(len(lengths), seed)[planned]
    if backend == "cpp":
        if implementation() != "cpp":
            raise RuntimeError("backend='cpp': the native extension packdit._C with plan_lookahead is not available")
        order, offsets, sizes = _ext.load().plan_lookahead(
            sub_lengths.ctypes.data, sub_costs.ctypes.data, sub_alltoall.ctypes.data, keys.ctypes.data,
            len(planned), int(capacity), int(ranks), int(window), list(sp_sizes),
        )
    else:
        order, offsets, sizes = _plan_python(sub_lengths, sub_costs, sub_alltoall, keys, int(capacity), int(ranks),
                                             int(window), sp_sizes)
    return Plan.from_bins(planned[np.asarray(order, dtype=np.int64)], offsets, ranks=int(ranks),
                          capacity=int(capacity), lengths=lengths, costs=costs, long_samples=too_long,
                          bin_sizes=sizes, sp_sizes=sp_sizes, alltoall_costs=alltoall)


class _Bins:
    """Bins of one window, each of a size class c (run by ``sp_sizes[c]`` ranks); mirrors ``Bins`` in
    ``csrc/pack/planner.cpp``. Within its class a bin is in exactly one heap: ``by_load`` (min (load, id)),
    the bins that may have room for the current sample, or ``parked`` (-room, id), those too full for a
    recent sample."""

    def __init__(self, sp_sizes: tuple[int, ...], capacity: int):
        self.sp_sizes, self.capacity = sp_sizes, capacity
        self.load: list[float] = []
        self.room: list[int] = []
        self.size_class: list[int] = []
        self.members: list[list[int]] = []
        self.by_load: list[list[tuple[float, int]]] = [[] for _ in sp_sizes]
        self.parked: list[list[tuple[int, int]]] = [[] for _ in sp_sizes]

    def open(self, c: int, count: int) -> None:
        for _ in range(count):
            heapq.heappush(self.by_load[c], (0.0, len(self.load)))
            self.load.append(0.0)
            self.room.append(self.sp_sizes[c] * self.capacity)
            self.size_class.append(c)
            self.members.append([])

    def select(self, c: int, need: int) -> int:
        """Least (load, id) bin of class ``c`` with at least ``need`` free tokens, or -1."""
        heap, parked, room = self.by_load[c], self.parked[c], self.room
        while parked and -parked[0][0] >= need:
            b = heapq.heappop(parked)[1]
            heapq.heappush(heap, (self.load[b], b))
        while heap and room[heap[0][1]] < need:
            b = heapq.heappop(heap)[1]
            heapq.heappush(parked, (-room[b], b))
        return heap[0][1] if heap else -1

    def place(self, b: int, sample: int, tokens: int, share: float) -> None:
        """Places a sample on the bin just returned by :meth:`select` for its class."""
        heap = self.by_load[self.size_class[b]]
        heapq.heappop(heap)
        self.load[b] += share
        self.room[b] -= tokens
        self.members[b].append(sample)
        heapq.heappush(heap, (self.load[b], b))

    def emit(self, ranks: int, order: list[int], offsets: list[int], bin_sizes: list[int]) -> None:
        """Appends the window's steps: level by level, the bins of class c and the groups of the level below
        sorted by (load desc, id asc) and cut into groups of ``sp_sizes[c + 1] / sp_sizes[c]`` (``ranks /
        sp_sizes[-1]`` at the top); a group's key and id are its first member's."""
        items: list[tuple[float, int, list[int]]] = []  # (key, id, bins in rank order)
        for c, size in enumerate(self.sp_sizes):
            items += [(self.load[b], b, [b]) for b in range(len(self.load)) if self.size_class[b] == c]
            items.sort(key=lambda item: (-item[0], item[1]))
            per_group = (self.sp_sizes[c + 1] if c + 1 < len(self.sp_sizes) else ranks) // size
            items = [(items[k][0], items[k][1], [b for item in items[k:k + per_group] for b in item[2]])
                     for k in range(0, len(items), per_group)]
        for b in (b for step in items for b in step[2]):
            order += self.members[b]
            offsets.append(len(order))
            bin_sizes.append(self.sp_sizes[self.size_class[b]])


def _plan_python(lengths, costs, alltoall, keys, capacity: int, ranks: int, window: int, sp_sizes: tuple[int, ...]):
    """Reference implementation of the planner (see the module docstring); returns (order, bin_offsets,
    bin_sizes) with indices into ``lengths``. Mirrors ``csrc/pack/planner.cpp`` operation for operation."""
    n, num_classes = len(lengths), len(sp_sizes)
    size_class = np.searchsorted(np.asarray(sp_sizes) * capacity, lengths).tolist()  # smallest P: L <= P * capacity
    lengths, costs, alltoall, keys = lengths.tolist(), costs.tolist(), alltoall.tolist(), keys.tolist()
    footprint = [length if c == 0 else sp_sizes[c] * capacity for length, c in zip(lengths, size_class)]
    budget = window * ranks * capacity

    def share(i: int, c: int) -> float:  # what each rank of a bin of size class c carries of sample i
        return costs[i] if c == 0 else (costs[i] + alltoall[i]) / sp_sizes[c]

    order, offsets, bin_sizes = [], [0], []
    was_carried = [False] * n
    carried: list[int] = []
    next_sample, stream_tokens_left = 0, sum(footprint)
    while next_sample < n or carried:
        chunk = list(carried)
        chunk_tokens = sum(footprint[i] for i in chunk)
        while next_sample < n and chunk_tokens + footprint[next_sample] <= budget:
            chunk.append(next_sample)
            chunk_tokens += footprint[next_sample]
            stream_tokens_left -= footprint[next_sample]
            next_sample += 1
        if stream_tokens_left < budget:
            chunk += range(next_sample, n)
            chunk_tokens += stream_tokens_left
            next_sample, stream_tokens_left = n, 0
        final = next_sample == n
        chunk.sort(key=lambda i: (-size_class[i], not was_carried[i], -costs[i], keys[i], i))

        bins = _Bins(sp_sizes, capacity)
        group_ranks = sum(sp_sizes[size_class[i]] for i in chunk if size_class[i])
        bins.open(0, ranks * max(1, -(-chunk_tokens // (ranks * capacity))) - group_ranks)
        for c in range(1, num_classes):
            bins.open(c, sum(size_class[i] == c for i in chunk))
        carried = []
        for i in chunk:
            own = size_class[i]
            best, best_finish = -1, 0.0
            for c in range(own, num_classes if own == 0 else own + 1):  # a long sample: its own size only
                b = bins.select(c, lengths[i])
                if b >= 0 and (best < 0 or bins.load[b] + share(i, c) < best_finish):
                    best, best_finish = b, bins.load[b] + share(i, c)
            if best < 0 and not final and not was_carried[i]:
                was_carried[i] = True
                carried.append(i)
                continue
            if best < 0:  # a new step (only a sample of size class 1 finds no bin: see the module docstring)
                bins.open(0, ranks)
                best = bins.select(0, lengths[i])
            bins.place(best, i, lengths[i], share(i, bins.size_class[best]))
        carried.sort()
        bins.emit(ranks, order, offsets, bin_sizes)
    return order, offsets, bin_sizes
