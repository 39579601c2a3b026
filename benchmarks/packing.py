"""Section ``packing``: load balance and padding of batching strategies, and the planner's speed.

For each mix and rank count, every strategy of :mod:`packdit.packing.baselines` plans the same sample
stream (capacity 131,072 tokens per rank, FLOP cost model of hidden size 3072, samples longer than the
capacity split off for context parallelism); the lookahead planner runs at windows 1..32. Reported:
balance efficiency E = useful cost / (ranks * sum over steps of the slowest rank's cost), padding if
packs were padded to the capacity / to the step's largest pack, steps, max reorder distance (steps),
and the planning time (C++ planner and its Python fallback). CPU only: planning runs on the host.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import Context, measure, print_table
from tqdm import tqdm
from workloads import MIXES, sample_lengths

from packdit.packing import implementation, plan_steps
from packdit.packing.baselines import STRATEGIES

CAPACITY, HIDDEN = 131_072, 3072
RANKS = (8, 64)
WINDOWS = (1, 2, 4, 8, 16, 32)
DEFAULT_MIX = "video-mix"


def _row(mix, ranks, strategy, window, plan, seconds) -> dict:
    s = plan.stats
    return {"mix": mix, "ranks": ranks, "strategy": strategy, "window": window,
            "E": s.balance_efficiency, "padding_to_capacity": s.padding_to_capacity,
            "padding_to_step_max": s.padding_to_step_max, "steps": s.num_steps,
            "max_reorder_distance": s.max_reorder_distance, "samples": s.num_samples,
            "long_samples": s.num_long_samples, "plan_ms": seconds * 1e3}


def _timed_plan(fn, lengths, **kwargs):
    t0 = time.perf_counter()
    plan = fn(lengths, capacity=CAPACITY, hidden_size=HIDDEN, split_long=True, **kwargs)
    return plan, time.perf_counter() - t0


def run(ctx: Context) -> list[dict]:
    num_samples = 50_000 if ctx.quick else 500_000
    rows = []
    runs = [(mix, ranks, name, window) for mix in MIXES for ranks in RANKS for name in STRATEGIES
            for window in (WINDOWS if name == "lookahead" else (None,))]
    lengths = {mix: np.array(sample_lengths(mix, num_samples, seed=0)) for mix in MIXES}
    for mix, ranks, name, window in tqdm(runs, desc="packing plans", unit="plan", leave=False):
        extra = {"window": window} if window else {}
        plan, seconds = _timed_plan(STRATEGIES[name], lengths[mix], ranks=ranks, **extra)
        rows.append(_row(mix, ranks, name, window, plan, seconds))
    print_table(f"packing: balance and padding ({num_samples} samples per mix, capacity {CAPACITY}, window "
                "16 for the lookahead planner)",
                [r for r in rows if r["window"] in (None, 16)],
                ["mix", "ranks", "strategy", "E", "padding_to_capacity", "padding_to_step_max", "steps",
                 "max_reorder_distance", "long_samples"])
    print_table("packing: lookahead planner vs window (video-mix)",
                [r for r in rows if r["mix"] == DEFAULT_MIX and r["strategy"] == "lookahead"],
                ["ranks", "window", "E", "padding_to_capacity", "max_reorder_distance"])
    rows += _planning_time(ctx)
    return rows


def _planning_time(ctx: Context) -> list[dict]:
    """Median planning time of the default mix on 64 ranks, window 16, per available backend."""
    sizes = {"cpp": 100_000 if ctx.quick else 1_000_000, "python": 20_000 if ctx.quick else 100_000}
    backends = ["cpp", "python"] if implementation() == "cpp" else ["python"]
    rows = []
    for backend in backends:
        lengths = np.array(sample_lengths(DEFAULT_MIX, sizes[backend], seed=1))
        t = measure(lambda: plan_steps(lengths, capacity=CAPACITY, ranks=64, hidden_size=HIDDEN, split_long=True,
                                       backend=backend), device=torch.device("cpu"),
                    warmup=1, repeats=3)
        rows.append({"mix": DEFAULT_MIX, "ranks": 64, "strategy": f"planning-time-{backend}", "window": 16,
                     "samples": len(lengths), "plan_ms": t.median_ms,
                     "us_per_sample": 1e3 * t.median_ms / len(lengths)})
    print_table("packing: planning time (one core)", rows, ["strategy", "samples", "plan_ms", "us_per_sample"])
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    quality = [r for r in rows if r["mix"] == DEFAULT_MIX and "E" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ranks, color in zip(RANKS, ("tab:blue", "tab:orange")):
        look = [r for r in quality if r["ranks"] == ranks and r["strategy"] == "lookahead"]
        ax1.plot([r["window"] for r in look], [r["E"] for r in look], "o-", color=color,
                 label=f"lookahead, {ranks} ranks")
        buckets = next(r for r in quality if r["ranks"] == ranks and r["strategy"] == "shape-buckets")
        ax1.axhline(buckets["E"], color=color, ls=":", label=f"shape buckets, {ranks} ranks")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("window (steps)")
    ax1.set_ylabel("balance efficiency E")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=7)
    ax1.set_title(f"{DEFAULT_MIX}: E vs lookahead window")
    names = list(STRATEGIES)
    x = np.arange(len(names))
    for k, ranks in enumerate(RANKS):
        by_name = {r["strategy"]: r for r in quality if r["ranks"] == ranks and r["window"] in (None, 16)}
        ax2.bar(x + (k - 0.5) * 0.4, [by_name[n]["E"] for n in names], 0.4, label=f"{ranks} ranks")
    ax2.set_xticks(x, names, rotation=15, fontsize=8)
    ax2.set_ylabel("balance efficiency E")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    ax2.set_title("per strategy (lookahead window 16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
