"""Packing planner: validity, C++ == Python, sequence-parallel groups, targets on the default mix, baselines,
cost calibration."""

import hashlib
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from packdit import _ext
from packdit.packing import CostModel, Group, Plan, calibrate, group_blocks, implementation, plan_steps
from packdit.packing.baselines import STRATEGIES
from packdit.packing.cost import ALLTOALL_FLOPS_PER_ELEMENT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import workloads  # noqa: E402

needs_ext = pytest.mark.skipif(implementation() != "cpp", reason="packdit._C with plan_lookahead not built")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "python"]


def assert_valid(plan: Plan, lengths, capacity: int, ranks: int, sp_sizes=(1,)):
    """Every sample exactly once (or left out as too long for the largest group); every step's groups tile its
    ranks in aligned blocks of sizes from ``sp_sizes``, each within its capacity; a sample longer than
    ``capacity`` on the smallest group that holds it; the per-rank views agree with the groups."""
    lengths = np.asarray(lengths)
    seen = [i for step in plan.groups for group in step for i in group.indices]
    assert sorted(seen + list(plan.long_samples)) == list(range(len(lengths))), "every sample exactly once"
    assert len(plan.groups) == len(plan.steps) == plan.num_steps
    for step, packs in zip(plan.groups, plan.steps):
        assert [r for group in step for r in group.ranks] == list(range(ranks)), "groups tile the ranks in order"
        for group in step:
            assert group.size in sp_sizes and group.first_rank % group.size == 0, "aligned blocks"
            assert lengths[group.indices].sum() <= group.size * capacity
            for i in group.indices:
                if lengths[i] > capacity:
                    assert group.size == min(p for p in sp_sizes if lengths[i] <= p * capacity), "smallest group"
            assert all(packs[r] == group.indices for r in group.ranks)
    for rank in range(ranks):
        groups = plan.rank_groups(rank)
        assert [g.indices for g in groups] == plan.rank_batches(rank) == [step[rank] for step in plan.steps]
        assert all(rank in g.ranks for g in groups)
    assert all(lengths[i] > max(sp_sizes) * capacity for i in plan.long_samples)


def random_case(rng: random.Random, sequence_parallel=False):
    """``(lengths, capacity, ranks, window, sp_sizes)``: without ``sequence_parallel`` every sample fits one rank;
    with it ``sp_sizes`` is a valid chain for ``ranks`` and some samples need a group."""
    capacity = rng.choice([1, 7, 64, 100, 1000])
    n = rng.choice([0, 1, 2, 5, 50, 300])
    ranks, sp_sizes = rng.choice([1, 2, 3, 8]), (1,)
    if sequence_parallel:
        ranks, sp_sizes = rng.choice([(1, (1,)), (2, (1, 2)), (4, (1, 2, 4)), (4, (1, 4)), (6, (1, 3)),
                                      (8, (1, 2, 4, 8)), (12, (1, 2, 6)), (16, (1, 4, 8))])
    top = max(sp_sizes) * capacity
    kind = rng.random()
    if kind < 0.2:  # ties, empty and full samples and groups
        lengths = [rng.choice([0, capacity, capacity // 2, 1, top, min(capacity + 1, top)]) for _ in range(n)]
    elif kind < 0.4:
        lengths = [rng.choice([capacity, top])] * n
    else:
        lengths = [rng.randint(0, capacity) if rng.random() < 0.8 else rng.randint(0, top) for _ in range(n)]
    return lengths, capacity, ranks, rng.choice([1, 2, 4, 16]), sp_sizes


@needs_ext
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("case_seed", range(60))
def test_cpp_equals_python_and_plans_are_valid(case_seed, sequence_parallel):
    rng = random.Random(case_seed)
    lengths, capacity, ranks, window, sp_sizes = random_case(rng, sequence_parallel)
    cost = rng.choice([None, CostModel(1.0, 0.0, 5.0), CostModel(0.0, 1.0, alltoall=3.0),
                       lambda L: (L % 7).astype(float)])  # the last is not monotone
    kwargs = dict(capacity=capacity, ranks=ranks, window=window, hidden_size=8, cost=cost, seed=case_seed,
                  sp_sizes=sp_sizes)
    fast, slow = plan_steps(lengths, backend="cpp", **kwargs), plan_steps(lengths, backend="python", **kwargs)
    assert fast.groups == slow.groups
    assert_valid(fast, lengths, capacity, ranks, sp_sizes)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("case_seed", range(10))
def test_python_fallback_plans_are_valid(case_seed, sequence_parallel, monkeypatch):
    monkeypatch.setenv("PACKDIT_DISABLE_EXT", "1")
    assert implementation() == "python"
    lengths, capacity, ranks, window, sp_sizes = random_case(random.Random(case_seed), sequence_parallel)
    assert_valid(plan_steps(lengths, capacity=capacity, ranks=ranks, window=window, hidden_size=8, sp_sizes=sp_sizes),
                 lengths, capacity, ranks, sp_sizes)


# sha256[:16] of the int64 order and bin offsets, and E, of plans made before sequence-parallel groups existed
GOLDEN = {
    (8, 16, "flops"): ("0a2829915716f0cc", 0.9801605801570042),
    (64, 16, "flops"): ("c74580f562b126e7", 0.9816274380887012),
    (8, 1, "flops"): ("7e6f6f0584a39ec9", 0.7111114171370417),
    (3, 4, "linear"): ("178828b89e29687c", 0.9892864429640706),
}


@pytest.mark.parametrize("backend", ["cpp", "python"])
@pytest.mark.parametrize("ranks, window, cost", list(GOLDEN))
def test_default_sp_sizes_give_the_plans_of_one_rank_packs_bit_for_bit(ranks, window, cost, backend):
    if backend == "cpp" and implementation() != "cpp":
        pytest.skip("packdit._C with plan_lookahead not built")
    rng = np.random.default_rng(2024)
    n = 20_000
    lengths = np.where(rng.random(n) < 0.3, rng.integers(200, 3_600, n), rng.integers(1_000, 140_000, n))
    plan = plan_steps(lengths, capacity=131_072, ranks=ranks, window=window, hidden_size=3072, split_long=True,
                      cost=CostModel(1.0, 0.0, 5.0) if cost == "linear" else None, backend=backend)
    digest = hashlib.sha256(plan.order.astype("<i8").tobytes() + plan.bin_offsets.astype("<i8").tobytes())
    assert (digest.hexdigest()[:16], plan.stats.balance_efficiency) == GOLDEN[ranks, window, cost]
    assert (plan.bin_sizes == 1).all() and plan.sp_sizes == (1,) and len(plan.long_samples) == 875


def test_deterministic_and_seed_only_breaks_ties():
    lengths = [5, 5, 5, 5, 3, 3, 9, 1] * 20
    a = plan_steps(lengths, capacity=16, ranks=2, window=4, hidden_size=4, seed=1)
    assert a.steps == plan_steps(lengths, capacity=16, ranks=2, window=4, hidden_size=4, seed=1).steps
    b = plan_steps(lengths, capacity=16, ranks=2, window=4, hidden_size=4, seed=2)
    assert a.steps != b.steps  # equal lengths swap places
    assert a.stats.balance_efficiency == pytest.approx(b.stats.balance_efficiency)


def test_long_sample_raises_or_is_split_off():
    with pytest.raises(ValueError, match=r"sample 2 has 150 tokens, more than capacity=100 tokens per rank \(1 such "
                                         r"samples\): it needs a group of at least 2 ranks: pass sp_sizes"):
        plan_steps([10, 20, 150, 30], capacity=100, ranks=2, hidden_size=8)
    plan = plan_steps([10, 20, 150, 30], capacity=100, ranks=2, hidden_size=8, split_long=True)
    assert plan.long_samples == (2,)
    assert_valid(plan, [10, 20, 150, 30], 100, 2)
    assert plan.stats.num_long_samples == 1 and plan.stats.num_samples == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_parallel_plan_by_hand(backend):
    # capacity 10, 4 ranks, groups of 1, 2 or 4, cost L**2, no all-to-all cost. Sizes: 30 tokens -> 4 ranks,
    # 12 -> 2, 8, 8, 5 -> 1. Footprints 40, 8, 8, 20, 5; window 1 = 40 tokens.
    # window 1: [0] (40); its 4-rank bin is the whole step.
    # window 2: the rest (41 < 40 + 40 left: it all joins), 2 steps = 8 ranks: a 2-rank bin for sample 3
    #   (load 144/2 = 72) and 6 unit bins; 8 and 8 (64 each) go on unit bins (64 < 72 + 32 on the group),
    #   5 (25) on a third (25 < 72 + 12.5). Merge: units (64, 64 | 25, 0 | 0, 0) in pairs; with the group
    #   (72) sorted 72, 64, 25, 0, in pairs -> step [group 3 | 64 | 64], step [25 | 0 | 0 | 0].
    plan = plan_steps([30, 8, 8, 12, 5], capacity=10, ranks=4, window=1, cost=CostModel(0.0, 1.0),
                      sp_sizes=(1, 2, 4), backend=backend)
    assert plan.groups[0] == [Group(0, 4, [0])]
    assert plan.groups[1][0] == Group(0, 2, [3])
    assert [(g.first_rank, g.size) for g in plan.groups[1][1:]] == [(2, 1), (3, 1)]
    assert sorted(g.indices for g in plan.groups[1][1:]) == [[1], [2]]  # equal costs: the tie keys decide
    assert plan.groups[2] == [Group(0, 1, [4]), Group(1, 1, []), Group(2, 1, []), Group(3, 1, [])]
    assert plan.rank_batches(1) == [[0], [3], []] and plan.steps[1][:2] == [[3], [3]]
    assert plan.rank_groups(3)[0] == Group(0, 4, [0]) and list(plan.rank_groups(3)[0].ranks) == [0, 1, 2, 3]
    assert list(plan.bin_sizes) == [4, 2, 1, 1, 1, 1, 1, 1] and list(plan.bin_first_rank) == [0, 0, 2, 3, 0, 1, 2, 3]
    s = plan.stats
    # E over GPUs: useful 900 + 64 + 64 + 144 + 25 = 1197; the GPUs carry 225 x 4 | 72, 72, 64, 64 | 25, 0, 0, 0
    assert s.balance_efficiency == pytest.approx(1197 / (4 * (225 + 72 + 25)))
    assert list(s.step_max_cost) == [225, 72, 25] and list(s.step_mean_cost) == [225, 68, 6.25]
    assert (s.num_sp_samples, s.num_sp_long_samples, s.sp_tokens, s.num_long_samples) == (2, 2, 42, 0)
    assert s.padding_to_capacity == pytest.approx(1 - 63 / 120)
    assert s.padding_to_step_max == pytest.approx(1 - 63 / (4 * (7.5 + 8 + 5)))  # per GPU: 30/4 | 12/2, 8, 8 | 5
    assert_valid(plan, [30, 8, 8, 12, 5], 10, 4, (1, 2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_samples_fill_a_group_when_it_balances_and_the_alltoall_cost_counts(backend):
    # capacity 10, 2 ranks, cost L: an 11-token sample needs both ranks (load 11/2 = 5.5, 9 tokens of room);
    # footprint 20 + 5 * 3 = 35 -> 2 steps: the group and 2 unit bins. Five 3-token samples (cost 3) go on
    # the units (3, 3, 6, 6) until a unit would reach 9 while the group reaches 5.5 + 3/2 = 7.
    lengths = [11, 3, 3, 3, 3, 3]
    plan = plan_steps(lengths, capacity=10, ranks=2, window=1, cost=CostModel(1.0, 0.0), sp_sizes=(1, 2),
                      backend=backend)
    (group,), units = plan.groups
    assert group.size == 2 and group.indices[0] == 0 and len(group.indices) == 2
    assert [(u.first_rank, u.size, len(u.indices)) for u in units] == [(0, 1, 2), (1, 1, 2)]
    assert plan.stats.balance_efficiency == pytest.approx(1.0)  # 7, 7 | 6, 6 for 26 units of work
    assert (plan.stats.num_sp_samples, plan.stats.num_sp_long_samples, plan.stats.sp_tokens) == (2, 1, 14)
    # an all-to-all cost of 1 per token: the group carries (11 + 11) / 2 = 11, a 3-token sample on it
    # (3 + 3) / 2 more, so every short sample stays on a unit bin (3, 3, 6, 6, 9)
    plan = plan_steps(lengths, capacity=10, ranks=2, window=1, cost=CostModel(1.0, 0.0, alltoall=1.0),
                      sp_sizes=(1, 2), backend=backend)
    assert plan.groups[0] == [Group(0, 2, [0])]
    assert sorted(len(u.indices) for u in plan.groups[1]) == [2, 3]
    s = plan.stats
    assert s.balance_efficiency == pytest.approx(26 / (2 * (11 + 9)))
    assert s.alltoall_fraction == pytest.approx(11 / (22 + 15))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_too_long_for_every_group_raises_or_is_left_out(backend):
    kwargs = dict(capacity=10, ranks=4, hidden_size=8, sp_sizes=(1, 2, 4), backend=backend)
    with pytest.raises(ValueError, match=r"sample 2 has 45 tokens, more than the largest sequence-parallel group "
                                         r"holds \(4 ranks x capacity=10 = 40 tokens\) \(1 such samples\): it "
                                         r"needs a group of at least 5 ranks"):
        plan_steps([10, 40, 45, 3], **kwargs)
    plan = plan_steps([10, 40, 45, 3], split_long=True, **kwargs)
    assert plan.long_samples == (2,) and plan.stats.num_long_samples == 1 and plan.stats.long_tokens == 45
    assert_valid(plan, [10, 40, 45, 3], 10, 4, (1, 2, 4))
    assert [g.size for step in plan.groups for g in step if 1 in g.indices] == [4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_long_samples_or_run_them_with_groups(backend):
    lengths = [5, 25, 7, 13, 2] * 4
    kwargs = dict(capacity=10, ranks=4, hidden_size=8, split_long=True, backend=backend)
    dropped, grouped = plan_steps(lengths, **kwargs), plan_steps(lengths, sp_sizes=(1, 2, 4), **kwargs)
    assert dropped.long_samples == (1, 3, 6, 8, 11, 13, 16, 18) and grouped.long_samples == ()
    assert grouped.stats.num_sp_long_samples == 8 and grouped.stats.sp_tokens >= 4 * (25 + 13)
    assert_valid(grouped, lengths, 10, 4, (1, 2, 4))


@pytest.mark.parametrize("sp_sizes, ranks, match", [
    ((2, 4), 4, r"sp_sizes: expected 1 among the sizes"),
    ((1, 3), 4, r"sp_sizes: 3 does not divide ranks=4"),
    ((1, 4, 6), 12, r"sp_sizes: 4 does not divide the next size 6"),
    ((1, 2, 8), 4, r"sp_sizes: 8 does not divide ranks=4"),
    (4, 4, r"sp_sizes: expected a sequence of group sizes"),
    ((), 4, r"sp_sizes: expected a sequence of group sizes"),
    ((1, 0), 4, r"sp_sizes: expected a sequence of group sizes .*got \(1, 0\)"),
    ((1, 2.5), 4, r"sp_sizes: expected a sequence of group sizes"),
    ("12", 4, r"sp_sizes: expected a sequence of group sizes"),
])
def test_invalid_sp_sizes(sp_sizes, ranks, match):
    with pytest.raises(ValueError, match=match):
        plan_steps([3, 4], capacity=8, ranks=ranks, hidden_size=8, sp_sizes=sp_sizes)


def test_sp_sizes_are_sorted_and_group_blocks_cover_every_group():
    plan = plan_steps([3, 20, 9, 40], capacity=10, ranks=8, hidden_size=8, sp_sizes=[4, 1, 2, 2])
    assert plan.sp_sizes == (1, 2, 4)
    assert group_blocks(8, (1, 2, 4)) == [(0, 2), (2, 2), (4, 2), (6, 2), (0, 4), (4, 4)]
    assert group_blocks(8, (1,)) == []
    blocks = set(group_blocks(8, plan.sp_sizes))
    assert {(g.first_rank, g.size) for step in plan.groups for g in step if g.size > 1} <= blocks


def test_plan_refuses_groups_that_do_not_tile_aligned_blocks():
    kwargs = dict(ranks=4, capacity=10, lengths=np.array([5, 5, 5]), costs=np.ones(3), sp_sizes=(1, 2))
    Plan.from_bins([0, 1, 2], [0, 1, 2, 3], bin_sizes=[2, 1, 1], **kwargs)
    with pytest.raises(ValueError, match=r"bin_sizes: bin 1 of 2 ranks starts at rank 1 of its step"):
        Plan.from_bins([0, 1, 2], [0, 1, 2, 3], bin_sizes=[1, 2, 1], **kwargs)
    with pytest.raises(ValueError, match=r"bin_sizes: bin 2 of 2 ranks starts at rank 3 of its step"):
        Plan.from_bins([0, 1, 2], [0, 1, 2, 3, 3, 3], bin_sizes=[2, 1, 2, 1, 2], **kwargs)
    with pytest.raises(ValueError, match=r"bin_sizes: the 3 bins are run by 5 ranks in all"):
        Plan.from_bins([0, 1, 2], [0, 1, 2, 3], bin_sizes=[2, 2, 1], **kwargs)
    with pytest.raises(ValueError, match=r"bin_sizes: bin 0 is run by 4 ranks, not one of sp_sizes=\(1, 2\)"):
        Plan.from_bins([0, 1, 2], [0, 1, 2, 3], bin_sizes=[4, 0, 0], **kwargs)


def test_flop_cost_model_alltoall_term():
    model = CostModel.flops(3072)
    assert model.alltoall == pytest.approx(8 * ALLTOALL_FLOPS_PER_ELEMENT / 12)  # 8 all-to-alls of N*D/P per block
    assert ALLTOALL_FLOPS_PER_ELEMENT == pytest.approx(400e12 * 2 / 370e9)
    assert list(model.alltoall_costs(np.array([0, 3]))) == [0.0, 3 * model.alltoall]
    assert CostModel.flops(64, alltoall_flops_per_element=0.0).alltoall == 0.0
    with pytest.raises(ValueError, match=r"CostModel.alltoall: expected a finite value >= 0, got -1"):
        CostModel(1.0, 1.0, alltoall=-1)
    # the same samples on a group cost each rank (cost + alltoall * L) / P
    plan = plan_steps([200, 100], capacity=100, ranks=2, window=1, hidden_size=3072, sp_sizes=(1, 2))
    assert plan.groups == [[Group(0, 2, [0])], [Group(0, 1, [1]), Group(1, 1, [])]]
    per_gpu = (model(np.array([200]))[0] + model.alltoall * 200) / 2
    assert plan.stats.step_max_cost[0] == pytest.approx(per_gpu)


@pytest.mark.parametrize("ranks, min_efficiency", [(8, 0.93), (64, 0.88)])
def test_long_video_mix_runs_every_sample_with_groups(ranks, min_efficiency):
    lengths = np.array(workloads.sample_lengths("video-1080p", 50_000, seed=0))
    kwargs = dict(capacity=131_072, ranks=ranks, hidden_size=3072, split_long=True)
    dropped = plan_steps(lengths, **kwargs).stats
    grouped = plan_steps(lengths, sp_sizes=(1, 2, 4, 8), **kwargs).stats
    assert dropped.num_long_samples == (lengths > 131_072).sum() > 0.01 * len(lengths)
    assert grouped.num_long_samples == 0 and grouped.num_sp_long_samples == dropped.num_long_samples
    assert grouped.balance_efficiency >= min_efficiency and grouped.max_reorder_distance < 3 * 16
    assert 0 < grouped.alltoall_fraction < 0.01


@pytest.mark.parametrize("bad, match", [
    (dict(capacity=0), "capacity"), (dict(ranks=-1), "ranks"), (dict(window=0), "window"),
    (dict(lengths=[3, -1]), "sample 1 has negative length"),
    (dict(cost=lambda L: 1.0), "same shape"), (dict(cost=lambda L: -L), "finite costs >= 0"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(lengths=[3, 4.5]), r"lengths: expected integer token counts, got 4.5 for sample 1"),
    (dict(lengths=np.array([3.0, np.nan])), r"lengths: expected integer token counts, got nan for sample 1"),
    (dict(lengths=[[3, 4], [1, 2]]), r"lengths: expected a 1-D sequence of token counts, got shape \(2, 2\)"),
    (dict(lengths=[[3], [4, 5]]), r"lengths: expected a 1-D sequence"),
    (dict(lengths=[True, False]), r"lengths: expected integer token counts, got dtype bool"),
    (dict(lengths=["3", "4"]), r"lengths: expected integer token counts, got dtype"),
    (dict(capacity=float("nan")), r"capacity: expected a positive int, got nan"),
    (dict(capacity=8.5), r"capacity: expected a positive int, got 8.5"),
    (dict(ranks="2"), r"ranks: expected a positive int, got '2'"),
    (dict(window=True), r"window: expected a positive int, got True"),
    (dict(seed=0.5), r"seed: expected an int, got 0.5"),
    (dict(lengths=[2**60] * 4, capacity=2**60, ranks=1, window=1), r"lengths: the samples claim 2\*\*62 tokens"),
])
def test_invalid_arguments(bad, match):
    kwargs = dict(lengths=[3, 4], capacity=8, ranks=2, window=2, hidden_size=8) | bad
    with pytest.raises(ValueError, match=match):
        plan_steps(kwargs.pop("lengths"), **kwargs)


def test_integral_floats_and_tensors_are_token_counts():
    expected = plan_steps([3, 4, 0], capacity=8, ranks=2, hidden_size=8).steps
    assert plan_steps(np.array([3.0, 4.0, 0.0]), capacity=8.0, ranks=2, hidden_size=8).steps == expected
    assert plan_steps(torch.tensor([3, 4, 0]), capacity=8, ranks=2, hidden_size=8).steps == expected


def test_stats_by_hand():
    # next-fit on capacity 10: packs [6], [6], [5, 3], [8] -> 2 steps of 2 ranks; cost(L) = L**2
    plan = STRATEGIES["navit-greedy"]([6, 6, 5, 3, 8], capacity=10, ranks=2, cost=CostModel(0.0, 1.0))
    assert plan.steps == [[[0], [1]], [[2, 3], [4]]]
    s = plan.stats
    assert s.balance_efficiency == pytest.approx((36 + 36 + 25 + 9 + 64) / (2 * (36 + 64)))
    assert s.padding_to_capacity == pytest.approx(1 - 28 / 40)
    assert s.padding_to_step_max == pytest.approx(1 - 28 / (2 * 6 + 2 * 8))
    assert list(s.step_max_cost) == [36, 64] and list(s.step_mean_cost) == [36, 49]
    assert s.max_reorder_distance == 0
    shuffled = Plan.from_bins([4, 1, 0, 2, 3], [0, 1, 2, 3, 5], ranks=2, capacity=10, lengths=plan.lengths,
                              costs=plan.costs)
    assert shuffled.stats.max_reorder_distance == 1  # sample 4 runs a step before samples 0..3


def test_incomplete_final_step_has_idle_ranks():
    plan = plan_steps([5, 5, 5], capacity=10, ranks=4, window=8, hidden_size=8)
    assert plan.num_steps == 1 and sorted(len(p) for p in plan.steps[0]) == [0, 1, 1, 1]


@pytest.mark.parametrize("ranks", [8, 64])
def test_default_mix_targets(ranks):
    lengths = workloads.sample_lengths("video-mix", 100_000, seed=0)
    kwargs = dict(capacity=131_072, ranks=ranks, hidden_size=3072, split_long=True)
    plan = plan_steps(lengths, window=16, **kwargs)
    s = plan.stats
    assert s.num_samples + s.num_long_samples == len(lengths)  # nothing dropped
    assert s.balance_efficiency >= 0.95
    assert s.padding_to_capacity <= 0.01
    assert s.max_reorder_distance < 3 * 16
    baselines = {name: STRATEGIES[name](lengths, **kwargs).stats.balance_efficiency
                 for name in ("pad-to-max", "shape-buckets", "per-step-lpt")}
    assert baselines["pad-to-max"] < 0.1 < baselines["shape-buckets"] < 0.7
    assert baselines["per-step-lpt"] < 0.7


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_baselines_are_valid(name):
    lengths = [random.Random(i).randint(0, 50) for i in range(200)] + [80]
    plan = STRATEGIES[name](lengths, capacity=64, ranks=3, hidden_size=8, split_long=True)
    assert_valid(plan, lengths, 64, 3)
    assert 0 < plan.stats.balance_efficiency <= 1


def test_calibrate_recovers_a_synthetic_cost():
    truth = CostModel(a=6 * 512, b=1.0, c=2e5)
    seconds_per_unit = 1e-12
    rng = np.random.default_rng(0)

    def timing(seqlens):  # a pack's time under `truth`, with 0.5% multiplicative noise
        return seconds_per_unit * float(truth(np.array(seqlens)).sum()) * (1 + 0.005 * rng.standard_normal())

    fit = calibrate(timing, "cpu", max_tokens=8192)
    assert fit.r2 > 0.99
    assert fit.model.a == pytest.approx(truth.a, rel=0.1)
    assert fit.model.c == pytest.approx(truth.c, rel=0.3)
    assert fit.seconds_per_unit == pytest.approx(seconds_per_unit, rel=0.1)


def test_calibrate_times_a_torch_function():
    import torch

    weight = torch.randn(64, 64)

    def make_input(seqlens, device):
        return (torch.randn(sum(seqlens), 64, device=device), seqlens)

    def fn(x, seqlens):  # per-token matmul plus per-sample L x L attention scores
        for chunk in (x @ weight).split(seqlens):
            chunk @ chunk.T

    fit = calibrate(fn, "cpu", make_input=make_input, max_tokens=512, repeats=2)
    assert np.isfinite(fit.r2) and min(fit.model.a, fit.model.b, fit.model.c) >= 0
    assert len(fit.seconds) == len(fit.packs)


def test_calibrate_a_packed_model():
    from packdit.reference.dit import DiT

    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    fit = calibrate(model, "cpu", packs=[[32], [16, 16], [8] * 4, [64], [4] * 8], repeats=1)
    assert np.isfinite(fit.r2) and len(fit.seconds) == 5 and all(s > 0 for s in fit.seconds)


@needs_ext
@pytest.mark.parametrize("mix, sp_sizes", [("video-mix", (1,)), ("video-1080p", (1, 2, 4, 8))])
def test_benchmark_plan_1m_samples_64_ranks_cpp(benchmark, mix, sp_sizes):
    lengths = np.tile(np.array(workloads.sample_lengths(mix, 100_000, seed=0)), 10)
    plan = benchmark.pedantic(plan_steps, args=(lengths,), rounds=1, iterations=1,
                              kwargs=dict(capacity=131_072, ranks=64, hidden_size=3072, split_long=True,
                                          sp_sizes=sp_sizes))
    assert len(plan.order) + len(plan.long_samples) == len(lengths)


def test_benchmark_plan_50k_samples_python(benchmark):
    lengths = workloads.sample_lengths("video-mix", 50_000, seed=0)
    plan = benchmark.pedantic(plan_steps, args=(lengths,), rounds=1, iterations=1,
                              kwargs=dict(capacity=131_072, ranks=64, hidden_size=3072, split_long=True,
                                          backend="python"))
    assert len(plan.order) + len(plan.long_samples) == len(lengths)


def test_extension_reports_planner():
    if _ext.load() is not None:
        assert hasattr(_ext.load(), "plan_lookahead")
