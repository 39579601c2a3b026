"""Batching strategies the lookahead planner is compared against; each returns a :class:`Plan`.

All read the samples in stream order, deal their packs (bins) to ranks ``ranks`` at a time (the last
step may have idle ranks) and take the same arguments as :func:`plan_steps` (cost model, long samples).

* :func:`pad_to_max`: fixed-shape batches. Every sample is padded to the longest planned one,
  ``L_max``; a rank's batch is ``B = max(1, capacity // L_max)`` consecutive samples and costs
  ``B * cost(L_max)`` (``B * L_max`` tokens), whatever it holds.
* :func:`shape_buckets`: Open-Sora-style buckets. Samples of one shape (here: one token count) wait
  in their bucket until ``max(1, capacity // L)`` of them form a batch of about ``capacity`` tokens;
  buckets still partly filled at the end of the stream become final, smaller batches.
* :func:`navit_greedy`: NaViT packing, next-fit: samples go into the current pack until the next one
  does not fit, which then opens a new pack.
* :func:`per_step_lpt`: balance within each step only: the planner with ``window=1``.
"""

from __future__ import annotations

import numpy as np

from packdit.packing.planner import Plan, plan_steps, prepare_samples

__all__ = ["pad_to_max", "shape_buckets", "navit_greedy", "per_step_lpt", "STRATEGIES"]


def _plan_of_bins(bins: list[list[int]], ranks: int, capacity: int, lengths, costs, too_long, **executed) -> Plan:
    """Plan dealing ``bins`` to ranks in order; empty bins complete the last step."""
    idle = -len(bins) % ranks
    sizes = [len(b) for b in bins] + [0] * idle
    order = np.array([i for b in bins for i in b], dtype=np.int64)
    padded = {k: np.concatenate([np.asarray(v, np.float64), np.zeros(idle)]) for k, v in executed.items()}
    return Plan.from_bins(order, np.concatenate([[0], np.cumsum(sizes)]), ranks=ranks, capacity=capacity,
                          lengths=lengths, costs=costs, long_samples=too_long, **padded)


def pad_to_max(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False) -> Plan:
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, cost=cost,
                                                        hidden_size=hidden_size, split_long=split_long)
    longest = int(lengths[planned].max()) if planned.size else 0
    per_batch = max(1, capacity // longest) if longest else 1
    bins = [planned[i:i + per_batch].tolist() for i in range(0, len(planned), per_batch)]
    # a padded sample costs what the longest one does: costs[argmax] is cost(L_max) under any cost model
    padded_cost = float(costs[planned][np.argmax(lengths[planned])]) if planned.size else 0.0
    return _plan_of_bins(bins, ranks, capacity, lengths, costs, too_long,
                         bin_tokens=[len(b) * longest for b in bins], bin_costs=[len(b) * padded_cost for b in bins])


def shape_buckets(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False) -> Plan:
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, cost=cost,
                                                        hidden_size=hidden_size, split_long=split_long)
    waiting: dict[int, list[int]] = {}
    bins = []
    for i in planned.tolist():
        length = int(lengths[i])
        bucket = waiting.setdefault(length, [])
        bucket.append(i)
        if len(bucket) == max(1, capacity // length if length else capacity):
            bins.append(bucket)
            waiting[length] = []
    bins += [b for b in waiting.values() if b]
    return _plan_of_bins(bins, ranks, capacity, lengths, costs, too_long)


def navit_greedy(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False) -> Plan:
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, cost=cost,
                                                        hidden_size=hidden_size, split_long=split_long)
    bins, current, tokens = [], [], 0
    for i in planned.tolist():
        if current and tokens + lengths[i] > capacity:
            bins.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += int(lengths[i])
    if current:
        bins.append(current)
    return _plan_of_bins(bins, ranks, capacity, lengths, costs, too_long)


def per_step_lpt(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False, seed=0) -> Plan:
    return plan_steps(lengths, capacity=capacity, ranks=ranks, hidden_size=hidden_size, cost=cost,
                      split_long=split_long, seed=seed, window=1)


#: name -> strategy, in the order the benchmark reports them (the lookahead planner last).
STRATEGIES = {
    "pad-to-max": pad_to_max,
    "shape-buckets": shape_buckets,
    "navit-greedy": navit_greedy,
    "per-step-lpt": per_step_lpt,
    "lookahead": plan_steps,
}
