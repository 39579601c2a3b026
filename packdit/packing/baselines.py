"""Batching strategies the lookahead planner is compared against; each returns a :class:`Plan`.

All take the samples in stream order and the same arguments as :func:`plan_steps` (cost model, long
samples); a step runs ``ranks`` bins (one per rank) and lasts as long as its costliest bin.

Padding (a ``(B, L_max)`` batch per rank; attention over all ``L_max`` keys with a key-padding mask, so a
padded sample costs what a sample of ``L_max`` tokens costs):

* :func:`pad_to_batch_max`: what a padded trainer does. Consecutive samples form a batch while
  ``count * L_max <= capacity``, ``L_max`` the batch's own longest sample; batches are dealt to ranks in
  stream order. A rank's batch costs ``count * cost(L_max)`` and holds ``count * L_max`` tokens.
* :func:`pad_to_max`: the same with ``L_max`` the longest sample of the whole stream (a fixed batch
  shape, as with static-shape compilation): the worst case, kept for reference.

Shape buckets (Open-Sora's variable-resolution sampler; no padding, every batch holds samples of one
shape, so a bucketing data pipeline resizes/crops samples to the bucket shapes first -- see
``benchmarks/workloads.py`` for such a bucket table):

* :func:`shape_buckets`: per-bucket batch sizes calibrated to equal step time under the memory cap, as
  Open-Sora's batch-size search does: the *base* bucket (the costliest sample shape) gets the largest
  batch that fits ``capacity`` tokens, ``b_base = max(1, capacity // L_base)``, every other bucket the
  largest batch that fits ``capacity`` tokens and is not slower than the base step,
  ``b_k = max(1, min(capacity // L_k, floor(b_base * cost_base / cost_k)))``. Each bucket's samples
  (stream order) are cut into batches of ``b_k`` (its last batch may be smaller; Open-Sora repeats samples
  to fill it), all batches of all buckets are shuffled into one access order (``seed``), and step s runs
  batches ``s*ranks .. s*ranks + ranks - 1`` of it: every rank draws its next batch independently of the
  others.
* :func:`shape_buckets_lookahead`: the same batches, assigned to steps by the planner's cost-aware window
  assignment (:func:`plan_steps` with every batch as one indivisible item: within each window of
  ``window * ranks`` batches, batches sorted by cost are cut into steps of ``ranks``). The difference
  between the two isolates what step assignment gains; the difference between this one and
  :func:`plan_steps` is what packing gains on top.

Packing (no padding, every sample at its own shape):

* :func:`navit_greedy`: NaViT packing, next-fit: samples go into the current pack until the next one
  does not fit, which then opens a new pack; packs dealt to ranks in stream order.
* :func:`per_step_lpt`: balance within each step only: the planner with ``window=1``.
* :func:`plan_steps` (``"lookahead"``): the planner, cost-aware over 16-step windows.
"""

from __future__ import annotations

import numpy as np

from packdit.packing.planner import Plan, plan_steps, prepare_samples

__all__ = ["pad_to_max", "pad_to_batch_max", "shape_buckets", "shape_buckets_lookahead", "bucket_batches",
           "navit_greedy", "per_step_lpt", "STRATEGIES"]


def _plan_of_bins(bins: list[list[int]], ranks: int, capacity: int, lengths, costs, too_long, **executed) -> Plan:
    """Plan dealing ``bins`` to ranks in order; empty bins complete the last step."""
    idle = -len(bins) % ranks
    sizes = [len(b) for b in bins] + [0] * idle
    order = np.array([i for b in bins for i in b], dtype=np.int64)
    padded = {k: np.concatenate([np.asarray(v, np.float64), np.zeros(idle)]) for k, v in executed.items()}
    return Plan.from_bins(order, np.concatenate([[0], np.cumsum(sizes)]), ranks=ranks, capacity=capacity,
                          lengths=lengths, costs=costs, long_samples=too_long, **padded)


def _padded_plan(batches: list[list[int]], ranks, capacity, lengths, costs, too_long) -> Plan:
    """Each batch runs every sample at the batch's longest length: ``count * L_max`` tokens, ``count * cost(L_max)``
    (``costs[argmax]`` is ``cost(L_max)`` under any cost model)."""
    longest = [int(np.argmax(lengths[b])) for b in batches]
    return _plan_of_bins(batches, ranks, capacity, lengths, costs, too_long,
                         bin_tokens=[len(b) * lengths[b[j]] for b, j in zip(batches, longest)],
                         bin_costs=[len(b) * costs[b[j]] for b, j in zip(batches, longest)])


def pad_to_max(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False) -> Plan:
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, cost=cost,
                                                        hidden_size=hidden_size, split_long=split_long)
    if not planned.size:
        return _plan_of_bins([], ranks, capacity, lengths, costs, too_long)
    longest = planned[int(np.argmax(lengths[planned]))]
    per_batch = max(1, capacity // int(lengths[longest])) if lengths[longest] else 1
    batches = [planned[i:i + per_batch].tolist() for i in range(0, len(planned), per_batch)]
    return _plan_of_bins(batches, ranks, capacity, lengths, costs, too_long,
                         bin_tokens=[len(b) * lengths[longest] for b in batches],
                         bin_costs=[len(b) * costs[longest] for b in batches])


def pad_to_batch_max(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False) -> Plan:
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, cost=cost,
                                                        hidden_size=hidden_size, split_long=split_long)
    batches, current, longest = [], [], 0
    for i in planned.tolist():
        if current and (len(current) + 1) * max(longest, int(lengths[i])) > capacity:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, int(lengths[i]))
    if current:
        batches.append(current)
    return _padded_plan(batches, ranks, capacity, lengths, costs, too_long)


def bucket_batches(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False, buckets=None,
                   seed=0, shuffle=True):
    """The batches of :func:`shape_buckets`, in access order, with the prepared samples.

    ``buckets`` (N,) int: the bucket (one sample shape) of every sample, default its length; all samples of
    a bucket must have the same length. Returns ``(batches, lengths, costs, too_long)``: ``batches`` a list
    of sample-index lists, shuffled with ``seed`` when ``shuffle``, else bucket by bucket in order of first
    appearance.
    """
    lengths, costs, planned, too_long = prepare_samples(lengths, capacity=capacity, ranks=ranks, cost=cost,
                                                        hidden_size=hidden_size, split_long=split_long)
    keys = lengths if buckets is None else np.asarray(buckets).reshape(-1)
    if keys.shape != lengths.shape:
        raise ValueError(f"buckets: expected one bucket id per sample ({lengths.shape[0]}), got shape {keys.shape}")
    members: dict = {}
    for i in planned.tolist():
        members.setdefault(keys[i].item(), []).append(i)
    for key, idx in members.items():
        if lengths[idx].min() != lengths[idx].max():
            raise ValueError(f"buckets: bucket {key} holds samples of {int(lengths[idx].min())} to "
                             f"{int(lengths[idx].max())} tokens; a bucket holds one sample shape")
    if not members:
        return [], lengths, costs, too_long
    first = {key: idx[0] for key, idx in members.items()}
    base = max(members, key=lambda key: costs[first[key]])  # the costliest sample shape sets the step time
    base_length, base_cost = int(lengths[first[base]]), float(costs[first[base]])
    step_cost = base_cost * max(1, capacity // base_length if base_length else 1)
    batches = []
    for key, idx in members.items():
        length, sample_cost = int(lengths[first[key]]), float(costs[first[key]])
        fits_memory = capacity // length if length else len(idx)
        fits_time = int(step_cost // sample_cost) if sample_cost > 0 else len(idx)
        size = max(1, min(fits_memory, fits_time))
        batches += [idx[j:j + size] for j in range(0, len(idx), size)]
    if shuffle:
        batches = [batches[j] for j in np.random.default_rng(seed).permutation(len(batches))]
    return batches, lengths, costs, too_long


def shape_buckets(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False, buckets=None,
                  seed=0, shuffle=True) -> Plan:
    batches, lengths, costs, too_long = bucket_batches(lengths, capacity=capacity, ranks=ranks,
                                                       hidden_size=hidden_size, cost=cost, split_long=split_long,
                                                       buckets=buckets, seed=seed, shuffle=shuffle)
    return _plan_of_bins(batches, ranks, capacity, lengths, costs, too_long)


def shape_buckets_lookahead(lengths, *, capacity, ranks, hidden_size=None, cost=None, split_long=False,
                            buckets=None, seed=0, shuffle=True, window=16) -> Plan:
    batches, lengths, costs, too_long = bucket_batches(lengths, capacity=capacity, ranks=ranks,
                                                       hidden_size=hidden_size, cost=cost, split_long=split_long,
                                                       buckets=buckets, seed=seed, shuffle=shuffle)
    batch_costs = np.array([costs[b].sum() for b in batches], dtype=np.float64)
    # every batch is planned as one item as long as the capacity, so each bin holds exactly one batch
    items = plan_steps(np.full(len(batches), capacity, dtype=np.int64), capacity=capacity, ranks=ranks,
                       window=window, cost=lambda _: batch_costs, seed=seed)
    bins = [[i for item in items.order[s:e] for i in batches[item]]
            for s, e in zip(items.bin_offsets[:-1], items.bin_offsets[1:])]
    return Plan.from_bins([i for b in bins for i in b], np.concatenate([[0], np.cumsum([len(b) for b in bins])]),
                          ranks=ranks, capacity=capacity, lengths=lengths, costs=costs, long_samples=too_long)


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


#: name -> strategy, in the order the benchmarks report them (the lookahead planner last). Every entry
#: takes ``(lengths, *, capacity, ranks, hidden_size=, cost=, split_long=)``; the two bucket strategies
#: also take ``buckets=`` (default: one bucket per distinct length).
STRATEGIES = {
    "pad-to-max": pad_to_max,
    "pad-to-batch-max": pad_to_batch_max,
    "shape-buckets": shape_buckets,
    "shape-buckets+lookahead": shape_buckets_lookahead,
    "navit-greedy": navit_greedy,
    "per-step-lpt": per_step_lpt,
    "lookahead": plan_steps,
}
