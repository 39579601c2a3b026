"""Batching baselines by hand: steps, balance efficiency E and padding of tiny streams, cost(L) = L**2."""

import sys
from pathlib import Path

import numpy as np
import pytest

from packdit.packing import CostModel
from packdit.packing.baselines import STRATEGIES, bucket_batches

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import workloads  # noqa: E402

SQUARE = CostModel(0.0, 1.0)


def padding(plan) -> float:
    """Fraction of the tokens the ranks compute that are padding."""
    return 1.0 - plan.lengths[plan.order].sum() / plan.bin_tokens.sum()


# Stream A: lengths [2, 3, 6, 1, 4], capacity 10, 2 ranks; useful cost 4 + 9 + 36 + 1 + 16 = 66.
# Stream B: lengths [6, 1, 5, 2] each its own bucket, capacity 6, 2 ranks; useful cost 36 + 1 + 25 + 4 = 66.
CASES = {
    # batches [2,3] (2 x 3 <= 10), [6], [1,4] (2 x 4 <= 10): costs 2*9, 36 | 2*16, idle -> steps 36 + 32;
    # tokens 6 + 6 + 8 = 20 of which 16 real
    "pad-to-batch-max": ("A", [[[0, 1], [2]], [[3, 4], []]], 66 / (2 * (36 + 32)), 1 - 16 / 20),
    # every sample padded to 6 -> batches of 10 // 6 = 1 costing 36 each: 3 steps of 36; 5 x 6 = 30 tokens
    "pad-to-max": ("A", [[[0], [1]], [[2], [3]], [[4], []]], 66 / (2 * 3 * 36), 1 - 16 / 30),
    # one batch per sample, in stream order: steps (36, 1), (25, 4) -> 36 + 25
    "shape-buckets": ("B", [[[0], [1]], [[2], [3]]], 66 / (2 * (36 + 25)), 0.0),
    # the same batches sorted by cost within the window: steps (36, 25), (4, 1) -> 36 + 4
    "shape-buckets+lookahead": ("B", [[[0], [2]], [[3], [1]]], 66 / (2 * (36 + 4)), 0.0),
    # next-fit on capacity 10: [2, 3], [6, 1], [4] -> steps (13, 37), (16, idle) -> 37 + 16
    "navit-greedy": ("A", [[[0, 1], [2, 3]], [[4], []]], 66 / (2 * (37 + 16)), 0.0),
    # the stream (16 tokens) is shorter than one window (2 x 10): one chunk of 1 step, LPT by cost under the
    # token cap: 6 -> bin 0 (36); 4 -> bin 1 (16); 3 -> bin 1 (25); 2 -> bin 1 (29); 1 -> bin 1 (30, full)
    "per-step-lpt": ("A", [[[2], [4, 1, 0, 3]]], 66 / (2 * 36), 0.0),
    "lookahead": ("A", [[[2], [4, 1, 0, 3]]], 66 / (2 * 36), 0.0),
}
STREAMS = {"A": ([2, 3, 6, 1, 4], 10, None), "B": ([6, 1, 5, 2], 6, [0, 1, 2, 3])}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_by_hand(name):
    stream, steps, efficiency, pad = CASES[name]
    lengths, capacity, buckets = STREAMS[stream]
    kwargs = dict(capacity=capacity, ranks=2, cost=SQUARE)
    if "buckets" in name:
        kwargs.update(buckets=buckets, shuffle=False)
    plan = STRATEGIES[name](lengths, **kwargs)
    assert plan.steps == steps
    assert plan.stats.balance_efficiency == pytest.approx(efficiency)
    assert padding(plan) == pytest.approx(pad)


def test_bucket_batch_sizes_equal_step_time_under_the_memory_cap():
    # buckets by length: 5 -> [0, 1], 2 -> [2, 4], 6 -> [3]. The costliest shape (6, cost 36) is the base:
    # 10 // 6 = 1 per batch, step cost 36. Length 5: memory allows 2, time 36 // 25 = 1 -> batches of 1.
    # Length 2: time allows 9, memory 10 // 2 = 5 -> one batch of both.
    batches, *_ = bucket_batches([5, 5, 2, 6, 2], capacity=10, ranks=2, cost=SQUARE, shuffle=False)
    assert batches == [[0], [1], [2, 4], [3]]
    plan = STRATEGIES["shape-buckets"]([5, 5, 2, 6, 2], capacity=10, ranks=2, cost=SQUARE, shuffle=False)
    assert plan.stats.balance_efficiency == pytest.approx(94 / (2 * (25 + 36)))  # steps (25, 25), (8, 36)
    # a bucket's samples beyond its batch size open more batches; the last one may be smaller
    batches, *_ = bucket_batches([2] * 7, capacity=6, ranks=2, cost=SQUARE, shuffle=False)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_bucket_order_is_shuffled_per_seed_and_ranks_draw_independently():
    lengths = [1, 2, 3, 4] * 10
    ordered, *_ = bucket_batches(lengths, capacity=4, ranks=2, cost=SQUARE, shuffle=False)
    shuffled, *_ = bucket_batches(lengths, capacity=4, ranks=2, cost=SQUARE, seed=3)
    assert sorted(map(sorted, shuffled)) == sorted(map(sorted, ordered)) and shuffled != ordered
    again, *_ = bucket_batches(lengths, capacity=4, ranks=2, cost=SQUARE, seed=3)
    assert again == shuffled
    plan = STRATEGIES["shape-buckets"](lengths, capacity=4, ranks=2, cost=SQUARE, seed=3)
    assert [pack for step in plan.steps for pack in step if pack] == shuffled  # step s: batches 2s, 2s + 1


def test_buckets_hold_one_shape():
    with pytest.raises(ValueError, match="bucket 0 holds samples of 2 to 3 tokens"):
        bucket_batches([2, 3], capacity=8, ranks=1, cost=SQUARE, buckets=[0, 0])
    with pytest.raises(ValueError, match="one bucket id per sample"):
        bucket_batches([2, 3], capacity=8, ranks=1, cost=SQUARE, buckets=[0])


def test_lookahead_over_buckets_keeps_the_batches():
    lengths = workloads.sample_lengths("video-mix", 3000, seed=0)
    kwargs = dict(capacity=131_072, ranks=8, hidden_size=3072, split_long=True)
    plain = STRATEGIES["shape-buckets"](lengths, **kwargs)
    sorted_steps = STRATEGIES["shape-buckets+lookahead"](lengths, **kwargs)
    as_set = lambda plan: sorted(sorted(p) for step in plan.steps for p in step if p)  # noqa: E731
    assert as_set(plain) == as_set(sorted_steps)
    assert sorted_steps.stats.balance_efficiency > plain.stats.balance_efficiency + 0.2


@pytest.mark.parametrize("shape, bucket", [
    ((4, 44, 80), (4, 44, 80)),          # 352 x 640 image (16:9 at 360p): its own bucket
    ((4, 9, 44, 80), (4, 9, 44, 80)),    # 33 frames: a bucket length
    ((4, 13, 44, 80), (4, 9, 44, 80)),   # 49 frames -> the 33-frame bucket (clip cut)
    ((4, 33, 90, 160), (4, 33, 90, 160)),  # 129 frames at 720p
    # 352 x 480 (4:3): 168,960 px < 0.8 x 230,400 (360p) -> 240p (103,680 px) at ratio 0.75:
    # sqrt(103,680 x 0.75) = 278.9 -> 272 px, sqrt(103,680 / 0.75) = 371.8 -> 368 px
    ((4, 44, 60), (4, 34, 46)),
    ((4, 18, 18), (4, 24, 24)),          # 144 x 144 < 0.8 x 36,864 (144p): upscaled to 192 x 192
])
def test_bucket_shape_by_hand(shape, bucket):
    assert workloads.bucket_shape(shape) == bucket


def test_bucket_shapes_of_the_default_mix():
    shapes = workloads.latent_shapes("video-mix", 2000, seed=0)
    bucketed = [workloads.bucket_shape(s) for s in shapes]
    assert all(len(b) == len(s) for s, b in zip(shapes, bucketed))  # images stay images, videos videos
    smallest = 144 * 256 / 64  # latent area of the 144p bucket
    for s, b in zip(shapes, bucketed):
        assert b[-2] * b[-1] <= 1.1 * max(s[-2] * s[-1] / 0.8, smallest), (s, b)  # 1.1: 16 px snapping
        assert len(s) == 3 or b[1] <= s[1]  # clips are cut, never stretched
    changed = np.mean([b != s for s, b in zip(shapes, bucketed)])
    assert 0.3 < changed < 0.8
