"""Load-balanced packing planner: which samples every rank trains on at every step.

A data-parallel step runs ``ranks`` packs at once and lasts as long as the slowest one, so the
planner balances *cost* (not tokens) across the ranks of a step, under a token cap per pack.

Algorithm (``plan_steps``), window after window of the sample stream:

1. Chunk: the samples carried over from the previous window, then samples in stream order while the
   chunk holds at most ``window * ranks * capacity`` tokens. If the rest of the stream holds fewer
   tokens than that, the chunk takes it all: the last window spans up to ``2 * window`` steps instead
   of leaving a short final window (a window of 1-2 steps balances like ``window=1``).
2. Bins: ``S * ranks`` empty bins, ``S = max(1, ceil(chunk_tokens / (ranks * capacity)))`` (S <= window
   except in the last window).
3. LPT (longest processing time first) under the token cap: samples sorted by (carried first, cost
   descending, tie key ascending, index ascending); each goes onto the bin with the least cost
   (ties: lowest bin id) among the bins with at least its length of free tokens. A sample that fits no
   bin is carried to the next window if it was not carried before and the stream is not exhausted;
   otherwise ``ranks`` more empty bins (one more step) are opened. So a sample is delayed by at most
   one window and none is dropped.
4. Steps: bins sorted by (cost descending, bin id) and cut into consecutive groups of ``ranks``, so
   every step holds bins of similar cost. Bins of the last window (or of an opened step) may be empty:
   such a step has ranks with no sample (their list is empty).

The tie key of sample i is ``splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15)``, so the plan is a
deterministic function of (lengths, costs, capacity, ranks, window, seed). The C++ implementation
(``packdit._C.plan_lookahead``) and :func:`_plan_python` give identical plans; the latter runs when
the native extension is not available.

Statistics (:class:`PlanStats`), for a plan of S steps, with ``cost_{s,r}`` the cost rank r runs at
step s (padded cost for padding baselines) and ``useful`` the sum of the samples' own costs:

* balance efficiency ``E = useful / (ranks * sum_s max_r cost_{s,r})``: the fraction of the ranks'
  time spent on useful work when every step waits for its slowest rank (1 = perfect);
* padding to capacity ``1 - tokens / (S * ranks * capacity)``: the fraction of padding tokens if every
  pack were padded to ``capacity`` (fixed-shape buffers); padding to the step max ``1 - tokens /
  sum_s ranks * max_r tokens_{s,r}`` pads each step's packs to its largest one;
* max reorder distance ``max_{i before j in the stream} step(i) - step(j)``: how many steps a sample
  runs after one that followed it in the stream (0 for an in-order plan). The planner keeps it about
  below ``3 * window``: a window's samples run in its own steps, a carried sample in the next window's,
  and the last window spans up to ``2 * window`` steps.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import numbers

import numpy as np

from packdit import _ext
from packdit.packing.cost import resolve_costs

__all__ = ["Plan", "PlanStats", "plan_steps", "prepare_samples", "as_lengths", "positive_int", "is_integer",
           "tie_keys", "implementation"]

_GOLDEN = 0x9E3779B97F4A7C15


def tie_keys(num_samples: int, seed: int) -> np.ndarray:
    """``(num_samples,)`` uint64: ``splitmix64(seed + (i + 1) * golden)`` for sample i (tie-breaking only)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (np.arange(1, num_samples + 1, dtype=np.uint64) * np.uint64(_GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclasses.dataclass(frozen=True, eq=False)
class PlanStats:
    """Summary of a plan; see the module docstring for the definitions."""

    num_steps: int
    num_samples: int
    num_long_samples: int
    balance_efficiency: float
    padding_to_capacity: float
    padding_to_step_max: float
    max_reorder_distance: int
    step_max_cost: np.ndarray   # (num_steps,) max over ranks of the cost each rank runs
    step_mean_cost: np.ndarray  # (num_steps,) mean over ranks

    def row(self) -> dict:
        """The scalar statistics as a flat dict (for tables)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("step_")}


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Samples per (step, rank), stored flat.

    ``order`` (M,) int64 holds sample indices grouped by bin; bin ``k = step * ranks + rank`` holds
    ``order[bin_offsets[k]:bin_offsets[k+1]]``. ``bin_tokens`` / ``bin_costs`` (num_bins,) are what a
    rank runs (padded values for padding baselines). ``lengths`` / ``costs`` (num_samples,) are every
    input sample's own tokens and cost. ``long_samples`` are samples longer than ``capacity`` left out
    of the steps (``split_long=True``).
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

    @classmethod
    def from_bins(cls, order, bin_offsets, *, ranks, capacity, lengths, costs, long_samples=(),
                  bin_tokens=None, bin_costs=None) -> Plan:
        """Plan of packed bins; ``bin_tokens`` / ``bin_costs`` default to the sums over each bin's samples."""
        order = np.asarray(order, dtype=np.int64)
        bin_offsets = np.asarray(bin_offsets, dtype=np.int64)
        if (len(bin_offsets) - 1) % ranks:
            raise ValueError(f"bin_offsets: {len(bin_offsets) - 1} bins is not a multiple of ranks={ranks}")
        if bin_tokens is None:
            bin_tokens = _segment_sums(lengths[order], bin_offsets)
        if bin_costs is None:
            bin_costs = _segment_sums(costs[order], bin_offsets)
        return cls(order, bin_offsets, ranks, capacity, lengths, costs, np.asarray(bin_tokens, np.float64),
                   np.asarray(bin_costs, np.float64), tuple(int(i) for i in long_samples))

    @property
    def num_steps(self) -> int:
        return (len(self.bin_offsets) - 1) // self.ranks

    def rank_batches(self, rank: int) -> list[list[int]]:
        """Rank ``rank``'s sample indices at every step."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank: expected 0 <= rank < {self.ranks}, got {rank}")
        starts = self.bin_offsets[rank:-1:self.ranks]
        ends = self.bin_offsets[rank + 1::self.ranks]
        return [self.order[s:e].tolist() for s, e in zip(starts, ends)]

    @functools.cached_property
    def steps(self) -> list[list[list[int]]]:
        """``steps[s][r]``: sample indices rank r trains on at step s (empty list for an idle rank)."""
        bins = np.split(self.order, self.bin_offsets[1:-1]) if len(self.bin_offsets) > 1 else []
        flat = [b.tolist() for b in bins]
        return [flat[s * self.ranks:(s + 1) * self.ranks] for s in range(self.num_steps)]

    @functools.cached_property
    def stats(self) -> PlanStats:
        R, S = self.ranks, self.num_steps
        planned = np.ones(len(self.lengths), dtype=bool)
        planned[list(self.long_samples)] = False
        tokens = float(self.lengths[planned].sum())
        useful = float(self.costs[planned].sum())
        bin_costs = self.bin_costs.reshape(S, R)
        bin_tokens = self.bin_tokens.reshape(S, R)
        step_max = bin_costs.max(axis=1) if S else np.zeros(0)
        busy = R * float(step_max.sum())
        padded_step_max = R * float(bin_tokens.max(axis=1).sum()) if S else 0.0
        return PlanStats(
            num_steps=S,
            num_samples=int(planned.sum()),
            num_long_samples=len(self.long_samples),
            balance_efficiency=useful / busy if busy > 0 else 1.0,
            padding_to_capacity=1.0 - tokens / (S * R * self.capacity) if S else 0.0,
            padding_to_step_max=1.0 - tokens / padded_step_max if padded_step_max > 0 else 0.0,
            max_reorder_distance=self._max_reorder_distance(planned),
            step_max_cost=step_max,
            step_mean_cost=bin_costs.mean(axis=1) if S else np.zeros(0),
        )

    def _max_reorder_distance(self, planned: np.ndarray) -> int:
        if not len(self.order):
            return 0
        step_of_sample = np.empty(len(self.lengths), dtype=np.int64)
        bin_sizes = np.diff(self.bin_offsets)
        step_of_sample[self.order] = np.repeat(np.arange(len(bin_sizes)) // self.ranks, bin_sizes)
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


def prepare_samples(lengths, *, capacity, ranks, window=1, cost=None, hidden_size=None, split_long=False):
    """Validate planner inputs; return ``(lengths int64, costs float64, planned, too_long)``, the last two
    the indices of the samples that fit ``capacity`` and of those that do not (ValueError for the latter
    unless ``split_long``)."""
    capacity, ranks, window = (positive_int(v, name) for v, name in
                               ((capacity, "capacity"), (ranks, "ranks"), (window, "window")))
    if window * ranks * capacity >= 2**62:
        raise ValueError(f"window * ranks * capacity = {window * ranks * capacity} tokens must stay below 2**62")
    lengths = as_lengths(lengths)
    costs = resolve_costs(lengths, cost, hidden_size)
    too_long = np.flatnonzero(lengths > capacity)
    if too_long.size and not split_long:
        i = int(too_long[0])
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens, more than capacity={capacity} tokens per rank "
            f"({too_long.size} such samples); splitting a sample across ranks (context parallelism) is future "
            "work: raise capacity, or pass split_long=True to list them in Plan.long_samples"
        )
    return lengths, costs, np.flatnonzero(lengths <= capacity), too_long


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
    backend: str | None = None,
) -> Plan:
    """Plan training steps for samples of ``lengths`` tokens on ``ranks`` data-parallel ranks.

    Args:
        lengths: token count of every sample, in stream order (a sequence or 1-D int array).
        capacity: max tokens per rank per step.
        ranks: data-parallel ranks.
        hidden_size: model width for the default cost ``6*hidden_size*L + L**2`` (:class:`CostModel`).
        window: lookahead in steps (1 = balance each step on its own).
        cost: a :class:`CostModel` or a vectorized callable ``lengths array -> costs``; overrides hidden_size.
        seed: tie-breaking seed.
        split_long: list samples longer than ``capacity`` in ``Plan.long_samples`` (to be run with
            sequence/context parallelism) instead of raising ValueError.
        backend: ``"cpp"`` or ``"python"`` to force an implementation (default: C++ when available).

    Returns a :class:`Plan`; see the module docstring for the algorithm and guarantees.
    """
    if not is_integer(seed):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    seed = int(seed)
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, window=window,
                                                        cost=cost, hidden_size=hidden_size, split_long=split_long)
    backend = backend or implementation()
    if backend not in ("cpp", "python"):
        raise ValueError(f"backend: expected 'cpp' or 'python', got {backend!r}")
    sub_lengths = np.ascontiguousarray(lengths[planned])
    sub_costs = np.ascontiguousarray(costs[planned])
    keys = tie_keys(len(lengths), seed)[planned]
    if backend == "cpp":
        if implementation() != "cpp":
            raise RuntimeError("backend='cpp': the native extension packdit._C with plan_lookahead is not available")
        order, offsets = _ext.load().plan_lookahead(
            sub_lengths.ctypes.data, sub_costs.ctypes.data, keys.ctypes.data, len(planned),
            int(capacity), int(ranks), int(window),
        )
    else:
        order, offsets = _plan_python(sub_lengths, sub_costs, keys, int(capacity), int(ranks), int(window))
    return Plan.from_bins(planned[np.asarray(order, dtype=np.int64)], offsets, ranks=int(ranks),
                          capacity=int(capacity), lengths=lengths, costs=costs, long_samples=too_long)


def _plan_python(lengths, costs, keys, capacity: int, ranks: int, window: int):
    """Reference implementation of the planner (see the module docstring); returns (order, bin_offsets)
    with indices into ``lengths``. Mirrors ``csrc/pack/planner.cpp`` operation for operation."""
    n = len(lengths)
    lengths, costs, keys = lengths.tolist(), costs.tolist(), keys.tolist()
    budget = window * ranks * capacity
    order, offsets = [], [0]
    carried: list[int] = []
    next_sample, stream_tokens_left = 0, sum(lengths)
    while next_sample < n or carried:
        chunk = list(carried)
        chunk_tokens = sum(lengths[i] for i in chunk)
        while next_sample < n and chunk_tokens + lengths[next_sample] <= budget:
            chunk.append(next_sample)
            chunk_tokens += lengths[next_sample]
            stream_tokens_left -= lengths[next_sample]
            next_sample += 1
        if stream_tokens_left < budget:
            chunk += range(next_sample, n)
            chunk_tokens += stream_tokens_left
            next_sample, stream_tokens_left = n, 0
        final = next_sample == n
        was_carried = set(carried)
        chunk.sort(key=lambda i: (i not in was_carried, -costs[i], keys[i], i))

        num_bins = ranks * max(1, -(-chunk_tokens // (ranks * capacity)))
        load = [0.0] * num_bins
        room = [capacity] * num_bins
        members: list[list[int]] = [[] for _ in range(num_bins)]
        by_load = [(0.0, b) for b in range(num_bins)]  # bins that may have room, min (load, id) first
        parked: list[tuple[int, int]] = []             # (-room, id): bins too full for a recent sample;
        # every bin sits in exactly one of the two heaps (see Bins in planner.cpp)
        carried = []
        for i in chunk:
            need = lengths[i]
            while True:
                while parked and -parked[0][0] >= need:
                    b = heapq.heappop(parked)[1]
                    heapq.heappush(by_load, (load[b], b))
                while by_load and room[by_load[0][1]] < need:
                    b = heapq.heappop(by_load)[1]
                    heapq.heappush(parked, (-room[b], b))
                if by_load:
                    break
                if not final and i not in was_carried:
                    break
                for b in range(num_bins, num_bins + ranks):
                    load.append(0.0)
                    room.append(capacity)
                    members.append([])
                    heapq.heappush(by_load, (0.0, b))
                num_bins += ranks
            if not by_load:
                carried.append(i)
                continue
            b = heapq.heappop(by_load)[1]
            load[b] += costs[i]
            room[b] -= need
            members[b].append(i)
            heapq.heappush(by_load, (load[b], b))
        carried.sort()
        for b in sorted(range(num_bins), key=lambda b: (-load[b], b)):
            order += members[b]
            offsets.append(len(order))
    return order, offsets
