"""Packing planner: validity, C++ == Python, targets on the default mix, baselines, cost calibration."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from packdit import _ext
from packdit.packing import CostModel, Plan, calibrate, implementation, plan_steps
from packdit.packing.baselines import STRATEGIES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import workloads  # noqa: E402

needs_ext = pytest.mark.skipif(implementation() != "cpp", reason="packdit._C with plan_lookahead not built")


def assert_valid(plan: Plan, lengths, capacity: int, ranks: int):
    lengths = np.asarray(lengths)
    seen = [i for step in plan.steps for pack in step for i in pack]
    assert sorted(seen + list(plan.long_samples)) == list(range(len(lengths))), "every sample exactly once"
    for step in plan.steps:
        assert len(step) == ranks
        for pack in step:
            assert lengths[pack].sum() <= capacity
    assert all(lengths[i] > capacity for i in plan.long_samples)


def random_case(rng: random.Random):
    capacity = rng.choice([1, 7, 64, 100, 1000])
    n = rng.choice([0, 1, 2, 5, 50, 300])
    kind = rng.random()
    if kind < 0.2:
        lengths = [rng.choice([0, capacity, capacity // 2, 1]) for _ in range(n)]  # ties, empty and full samples
    elif kind < 0.4:
        lengths = [capacity] * n
    else:
        lengths = [rng.randint(0, capacity) for _ in range(n)]
    return lengths, capacity, rng.choice([1, 2, 3, 8]), rng.choice([1, 2, 4, 16])


@needs_ext
@pytest.mark.parametrize("case_seed", range(60))
def test_cpp_equals_python_and_plans_are_valid(case_seed):
    rng = random.Random(case_seed)
    lengths, capacity, ranks, window = random_case(rng)
    cost = rng.choice([None, CostModel(1.0, 0.0, 5.0), lambda L: (L % 7).astype(float)])  # the last is not monotone
    kwargs = dict(capacity=capacity, ranks=ranks, window=window, hidden_size=8, cost=cost, seed=case_seed)
    fast, slow = plan_steps(lengths, backend="cpp", **kwargs), plan_steps(lengths, backend="python", **kwargs)
    assert fast.steps == slow.steps
    assert_valid(fast, lengths, capacity, ranks)


@pytest.mark.parametrize("case_seed", range(10))
def test_python_fallback_plans_are_valid(case_seed, monkeypatch):
    monkeypatch.setenv("PACKDIT_DISABLE_EXT", "1")
    assert implementation() == "python"
    lengths, capacity, ranks, window = random_case(random.Random(case_seed))
    assert_valid(plan_steps(lengths, capacity=capacity, ranks=ranks, window=window, hidden_size=8), lengths,
                 capacity, ranks)


def test_deterministic_and_seed_only_breaks_ties():
    lengths = [5, 5, 5, 5, 3, 3, 9, 1] * 20
    a = plan_steps(lengths, capacity=16, ranks=2, window=4, hidden_size=4, seed=1)
    assert a.steps == plan_steps(lengths, capacity=16, ranks=2, window=4, hidden_size=4, seed=1).steps
    b = plan_steps(lengths, capacity=16, ranks=2, window=4, hidden_size=4, seed=2)
    assert a.steps != b.steps  # equal lengths swap places
    assert a.stats.balance_efficiency == pytest.approx(b.stats.balance_efficiency)


def test_long_sample_raises_or_is_split_off():
    with pytest.raises(ValueError, match=r"sample 2 has 150 tokens.*capacity=100.*context parallelism.*future"):
        plan_steps([10, 20, 150, 30], capacity=100, ranks=2, hidden_size=8)
    plan = plan_steps([10, 20, 150, 30], capacity=100, ranks=2, hidden_size=8, split_long=True)
    assert plan.long_samples == (2,)
    assert_valid(plan, [10, 20, 150, 30], 100, 2)
    assert plan.stats.num_long_samples == 1 and plan.stats.num_samples == 3


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
def test_benchmark_plan_1m_samples_64_ranks_cpp(benchmark):
    lengths = np.tile(np.array(workloads.sample_lengths("video-mix", 100_000, seed=0)), 10)
    plan = benchmark.pedantic(plan_steps, args=(lengths,), rounds=1, iterations=1,
                              kwargs=dict(capacity=131_072, ranks=64, hidden_size=3072, split_long=True))
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
