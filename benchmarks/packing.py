"""Section ``packing``: load balance, padding and sample fidelity of batching strategies, and the planner's speed.

Every strategy of :mod:`packdit.packing.baselines` plans the same sample stream per mix and rank count
(capacity 131,072 tokens per rank, FLOP cost model of hidden size 3072; samples longer than the capacity
are split off for context parallelism in every strategy), the lookahead planner at windows 1..32:

* ``pad-to-batch-max``: a padded trainer, each batch padded to its own longest sample;
  ``pad-to-max`` pads to the stream's longest sample (a fixed batch shape), for reference;
* ``shape-buckets``: Open-Sora's bucket sampler -- samples resized/cropped to the bucket table of
  ``workloads.bucket_shape``, per-bucket batch sizes for equal step time under the memory cap, shuffled
  batch order, every rank drawing its batches independently;
* ``shape-buckets+lookahead``: the same batches, assigned to steps by the planner's cost-aware windows;
* ``navit-greedy``, ``per-step-lpt``, ``lookahead``: packing, every sample at its own shape.

Long samples, drop vs sequence-parallel groups (``video-1080p``, videos up to 1080p x 201 frames, i.e.
51 x 68 x 120 = 416k tokens; see ``workloads.py``): the lookahead planner (window 16) either drops the
samples longer than the capacity (``lookahead``, ``split_long=True`` as everywhere above) or runs them on
the smallest group of 2, 4 or 8 ranks that holds them (``lookahead+sp``, ``sp_sizes=(1, 2, 4, 8)``), at 8
and 64 ranks; E over GPUs, the samples and tokens dropped, and those run by groups.

Reported per plan: balance efficiency E = useful cost / (ranks * sum over steps of the slowest rank's
cost) (useful: the cost of the samples as trained, i.e. after bucket resizing), padding (fraction of the
tokens the ranks compute that are padding), padding if packs were padded to the capacity, steps, max
reorder distance (steps), the fraction of samples -- and of the stream's tokens -- whose resolution or
duration the strategy changes, the tokens trained over the stream's tokens, the fraction of the stream's
samples and tokens dropped (too long), and the planning time. Every plan is checked before it is
reported (each sample exactly once, or split off as too long; every group's samples within its capacity;
the groups of every step tile its ranks), and the C++ planner's plans against the Python fallback's on
the streams it times; a plan that fails is refused. The planning time is wall time (median of 3) and the
process CPU time of the same calls, as the machine may be shared. CPU only: planning runs on the host.
"""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
import torch
from common import Context, OutputMismatch, measure, print_table, refused_row, verify_outputs
from tqdm import tqdm
from workloads import MIXES, bucket_shape, latent_shapes, num_patches

from packdit.packing import implementation, plan_steps
from packdit.packing.baselines import STRATEGIES

CAPACITY, HIDDEN = 131_072, 3072
RANKS = (8, 64)
WINDOWS = (1, 2, 4, 8, 16, 32)
DEFAULT_MIX = "video-mix"
LONG_MIX, SP_SIZES = "video-1080p", (1, 2, 4, 8)
BUCKET_STRATEGIES = ("shape-buckets", "shape-buckets+lookahead")
COLUMNS = ["mix", "ranks", "strategy", "E", "padding", "padding_to_capacity", "steps", "max_reorder_distance",
           "changed_samples", "changed_tokens", "tokens_trained", "dropped_samples"]
SP_COLUMNS = ["ranks", "strategy", "E", "dropped_samples", "dropped_tokens", "sp_samples", "sp_long_samples",
              "sp_tokens", "alltoall_fraction", "steps", "padding_to_capacity", "max_reorder_distance"]


class Stream:
    """A mix's samples: original token counts, and the bucketed token counts and bucket ids (shape index)."""

    def __init__(self, mix: str, num_samples: int):
        shapes = latent_shapes(mix, num_samples, seed=0)
        bucketed = {s: bucket_shape(s) for s in set(shapes)}  # a few hundred distinct shapes
        self.lengths = np.array([num_patches(s) for s in shapes])
        bucket_ids = {shape: k for k, shape in enumerate(sorted(set(bucketed.values())))}
        self.buckets = np.array([bucket_ids[bucketed[s]] for s in shapes])
        self.changed = np.array([bucketed[s] != s for s in shapes])
        # samples too long for the capacity keep their length, so every strategy splits off the same ones
        bucket_lengths = np.array([num_patches(bucketed[s]) for s in shapes])
        self.bucket_lengths = np.where(self.lengths > CAPACITY, self.lengths, bucket_lengths)


def _row(mix, ranks, strategy, window, plan, seconds, stream: Stream) -> dict:
    s = plan.stats
    planned = np.ones(len(plan.lengths), dtype=bool)
    planned[list(plan.long_samples)] = False
    changed = stream.changed[planned] if strategy in BUCKET_STRATEGIES else np.zeros(planned.sum(), dtype=bool)
    own = stream.lengths[planned]
    stream_tokens = float(stream.lengths.sum())
    return {"mix": mix, "ranks": ranks, "strategy": strategy, "window": window,
            "E": s.balance_efficiency, "padding": 1.0 - plan.lengths[planned].sum() / plan.bin_tokens.sum(),
            "padding_to_capacity": s.padding_to_capacity, "padding_to_step_max": s.padding_to_step_max,
            "steps": s.num_steps, "max_reorder_distance": s.max_reorder_distance, "samples": s.num_samples,
            "long_samples": s.num_long_samples, "changed_samples": float(changed.mean()),
            "changed_tokens": float(own[changed].sum() / own.sum()),
            "tokens_trained": float(plan.lengths[planned].sum() / own.sum()),
            "dropped_samples": s.num_long_samples / len(plan.lengths),
            "dropped_tokens": float(stream.lengths[~planned].sum()) / stream_tokens,
            "sp_samples": s.num_sp_samples, "sp_long_samples": s.num_sp_long_samples,
            "sp_tokens": s.sp_tokens / stream_tokens, "alltoall_fraction": s.alltoall_fraction,
            "plan_ms": seconds * 1e3}


def check_plan(label: str, plan, capacity: int) -> None:
    """Raise :class:`OutputMismatch` unless every sample is planned exactly once (or listed as too long), every
    group's samples fit ``capacity`` tokens per rank of the group, and the groups of every step tile its
    ``plan.ranks`` ranks in aligned blocks."""
    seen = np.sort(np.concatenate([plan.order, np.asarray(plan.long_samples, dtype=np.int64)]))
    if not np.array_equal(seen, np.arange(len(plan.lengths))):
        raise OutputMismatch(f"{label}: the plan does not hold every sample exactly once; not reported")
    bin_tokens = np.add.reduceat(np.append(plan.lengths[plan.order], 0), plan.bin_offsets[:-1]) \
        * (np.diff(plan.bin_offsets) > 0)
    starts = np.cumsum(plan.bin_sizes) - plan.bin_sizes  # each group's first rank, counted over all steps
    tiled = starts[-1:].sum() + plan.bin_sizes[-1:].sum() == plan.ranks * plan.num_steps and \
        not (starts % plan.bin_sizes).any() and not (plan.ranks % plan.bin_sizes).any()
    if (bin_tokens > capacity * plan.bin_sizes).any() or not tiled:
        raise OutputMismatch(f"{label}: a group's samples exceed the capacity of {capacity} tokens per rank, or "
                             f"the groups of a step do not tile its {plan.ranks} ranks; not reported")


def _plan(name: str, stream: Stream, ranks: int, window: int | None):
    kwargs = dict(capacity=CAPACITY, ranks=ranks, hidden_size=HIDDEN, split_long=True)
    lengths = stream.lengths
    if name in BUCKET_STRATEGIES:
        lengths, kwargs["buckets"] = stream.bucket_lengths, stream.buckets
    if name == "lookahead+sp":
        name, kwargs["sp_sizes"] = "lookahead", SP_SIZES
    if window:
        kwargs["window"] = window
    t0 = time.perf_counter()
    plan = STRATEGIES[name](lengths, **kwargs)
    return plan, time.perf_counter() - t0


def run(ctx: Context) -> list[dict]:
    num_samples = 20_000 if ctx.quick else 500_000
    runs = [(mix, ranks, name, window) for mix in MIXES for ranks in RANKS for name in STRATEGIES
            for window in (WINDOWS if name == "lookahead" else (None,))]
    runs += [(LONG_MIX, ranks, "lookahead+sp", 16) for ranks in RANKS]
    streams = {mix: Stream(mix, num_samples) for mix in MIXES}
    rows = []
    for mix, ranks, name, window in tqdm(runs, desc="packing plans", unit="plan", leave=False):
        plan, seconds = _plan(name, streams[mix], ranks, window)
        try:
            check_plan(f"packing/{mix}/{ranks}/{name}/{window}", plan, CAPACITY)
        except OutputMismatch as e:
            rows.append(refused_row({"mix": mix, "ranks": ranks, "strategy": name, "window": window}, e))
            continue
        rows.append(_row(mix, ranks, name, window, plan, seconds, streams[mix]))
    print_table(f"packing: balance, padding and changed samples ({num_samples} samples per mix, capacity "
                f"{CAPACITY}, lookahead window 16)", [r for r in rows if r["window"] in (None, 16) and "E" in r],
                COLUMNS)
    print_table("packing: lookahead planner vs window (video-mix)",
                [r for r in rows if r["mix"] == DEFAULT_MIX and r["strategy"] == "lookahead"],
                ["ranks", "window", "E", "padding_to_capacity", "max_reorder_distance"])
    print_table(f"packing: samples longer than the capacity on {LONG_MIX}, dropped (lookahead) or run by groups "
                f"of {'/'.join(map(str, SP_SIZES[1:]))} ranks (lookahead+sp), window 16",
                [r for r in rows if r["mix"] == LONG_MIX and r["strategy"].startswith("lookahead")
                 and r.get("window") == 16 and "E" in r], SP_COLUMNS)
    return rows + _planning_time(ctx)


def _planning_time(ctx: Context) -> list[dict]:
    """Median planning time on 64 ranks, window 16, per available backend: the default mix with one rank per
    pack, and the long-video mix with sequence-parallel groups."""
    sizes = {"cpp": 100_000 if ctx.quick else 1_000_000, "python": 20_000 if ctx.quick else 100_000}
    backends = ["cpp", "python"] if implementation() == "cpp" else ["python"]
    cases = [(DEFAULT_MIX, (1,), ""), (LONG_MIX, SP_SIZES, "-sp")]
    rows = []
    for mix, sp_sizes, suffix in cases:
        kwargs = dict(capacity=CAPACITY, ranks=64, hidden_size=HIDDEN, split_long=True, sp_sizes=sp_sizes)
        label = {"mix": mix, "ranks": 64, "strategy": f"planning-time{suffix}", "window": 16}
        if backends == ["cpp", "python"]:  # the two implementations must give the same plan before both are timed
            lengths = np.array([num_patches(s) for s in latent_shapes(mix, sizes["python"], seed=1)])
            plans = [plan_steps(lengths, backend=b, **kwargs) for b in backends]
            cpp, python = ([torch.from_numpy(a) for a in (p.order, p.bin_offsets, p.bin_sizes)] for p in plans)
            try:
                verify_outputs(f"packing/planner C++ vs Python ({mix})", cpp, python, tol=0.0,
                               names=["order", "bin offsets", "bin sizes"])
            except OutputMismatch as e:
                rows.append(refused_row(label, e))
                continue
        for backend in backends:
            lengths = np.array([num_patches(s) for s in latent_shapes(mix, sizes[backend], seed=1)])
            cpu_seconds: list[float] = []
            t = measure(functools.partial(_plan_timed, lengths, backend, kwargs, cpu_seconds),
                        device=torch.device("cpu"), warmup=1, repeats=3)
            rows.append({**label, "strategy": f"planning-time{suffix}-{backend}", "samples": len(lengths),
                         "sp_sizes": "/".join(map(str, sp_sizes)), "plan_ms": t.median_ms,
                         "plan_cpu_ms": 1e3 * statistics.median(cpu_seconds[1:]),
                         "us_per_sample": 1e3 * t.median_ms / len(lengths)})
    print_table("packing: planning time (one core; wall and process CPU time)", rows,
                ["strategy", "mix", "sp_sizes", "samples", "plan_ms", "plan_cpu_ms", "us_per_sample"])
    return rows


def _plan_timed(lengths, backend: str, kwargs: dict, cpu_seconds: list[float]) -> None:
    """Plan ``lengths``; append the process CPU time it took to ``cpu_seconds``."""
    start = time.process_time()
    plan_steps(lengths, backend=backend, **kwargs)
    cpu_seconds.append(time.process_time() - start)


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    quality = [r for r in rows if r["mix"] == DEFAULT_MIX and "E" in r]
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(20, 4.2),
                                             gridspec_kw={"width_ratios": [1, 1.6, 1.1, 0.9]})
    for ranks, color in zip(RANKS, ("tab:blue", "tab:orange")):
        look = [r for r in quality if r["ranks"] == ranks and r["strategy"] == "lookahead"]
        ax1.plot([r["window"] for r in look], [r["E"] for r in look], "o-", color=color, label=f"packed, {ranks} ranks")
        for name, style in zip(BUCKET_STRATEGIES, (":", "--")):
            bucket = next(r for r in quality if r["ranks"] == ranks and r["strategy"] == name)
            window = " (window 16)" if name.endswith("lookahead") else ""
            ax1.axhline(bucket["E"], color=color, ls=style, lw=1, label=f"{name}{window}, {ranks} ranks")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("lookahead window (steps)")
    ax1.set_ylabel("balance efficiency E")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=6)
    ax1.set_title(f"{DEFAULT_MIX}: E vs lookahead window", fontsize=9)
    names = list(STRATEGIES)
    x = np.arange(len(names))
    for k, ranks in enumerate(RANKS):
        by_name = {r["strategy"]: r for r in quality if r["ranks"] == ranks and r["window"] in (None, 16)}
        ax2.bar(x + (k - 0.5) * 0.4, [by_name[n]["E"] for n in names], 0.4, label=f"E, {ranks} ranks")
    ax2.set_xticks(x, names, fontsize=7, rotation=20, ha="right")
    ax2.set_ylabel("balance efficiency E (lookahead: window 16)")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    ax2.set_title("per strategy", fontsize=9)
    by_name = {r["strategy"]: r for r in quality if r["ranks"] == RANKS[0] and r["window"] in (None, 16)}
    fields = (("padding", "padding (of computed tokens)"), ("changed_samples", "samples resized/cropped"),
              ("changed_tokens", "tokens in resized/cropped samples"))
    for k, (field, label) in enumerate(fields):
        ax3.barh(x + (k - 1) * 0.27, [100 * by_name[n][field] for n in names], 0.27, label=label)
    ax3.set_yticks(x, names, fontsize=7)
    ax3.invert_yaxis()
    ax3.set_xlabel("%")
    ax3.legend(fontsize=6)
    ax3.set_title("what each strategy does to the data", fontsize=9)
    long_rows = {(r["strategy"], r["ranks"]): r for r in rows if r["mix"] == LONG_MIX and r.get("window") == 16
                 and "E" in r}
    for k, (strategy, label) in enumerate((("lookahead", "drop long samples"), ("lookahead+sp", "SP groups"))):
        found = [long_rows.get((strategy, ranks)) for ranks in RANKS]
        if None in found:
            continue
        x = np.arange(len(RANKS)) + (k - 0.5) * 0.4
        ax4.bar(x, [r["E"] for r in found], 0.18, label=f"E, {label}")
        ax4.bar(x + 0.18, [1 - r["dropped_tokens"] for r in found], 0.18, label=f"tokens trained, {label}")
    ax4.set_xticks(np.arange(len(RANKS)) + 0.09, [f"{ranks} ranks" for ranks in RANKS])
    ax4.set_ylim(0, 1.3)
    ax4.set_yticks(np.linspace(0, 1, 6))
    ax4.legend(fontsize=6, loc="upper center", ncol=2)
    ax4.set_title(f"{LONG_MIX}: drop long samples vs SP groups", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
