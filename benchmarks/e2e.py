"""Section ``e2e``: one DiT training step (fwd + bwd + AdamW) on the same sample stream, three ways.

* ``pad``: batches in stream order, every sample padded to the longest in its batch (the batch holds as
  many samples as fit ``capacity`` tokens after padding). Padding tokens are run as part of their
  sample, which costs what masked attention over a padded ``(B, L_max)`` batch costs; the loss covers
  real tokens only. Also run on the ``torch`` backend ("what people do today": eager PyTorch, padding).
* ``bucket``: Open-Sora-style shape buckets: samples of one latent shape batched together up to
  ``capacity`` tokens; no padding, but many small, shape-specific batches.
* ``pack``: packdit's planner packs the stream into steps of at most ``capacity`` tokens; one packed
  sequence per step, varlen kernels, no padding.

Reported per strategy: steps, total time for the stream (sum of per-step medians), samples/s, useful
(real) tokens/s, padding fraction, MFU from useful FLOPs (GPU only) and peak memory; speedups are
relative to ``pad``. Useful FLOPs of a sample of L tokens, hidden D, depth n (training = 3 x forward):
``3 * n * (24 L D^2 + 4 L^2 D)``.

Multi-rank simulation: the measured ``pack`` step times calibrate the planner's cost model
(``time = a sum L + b sum L^2 + c k``, :func:`packdit.packing.calibrate`; its R^2 and the mean error of
the predicted step times are reported), which then predicts the time of a longer stream of the same mix
on 8 data-parallel ranks for each batching strategy: sum over steps of the slowest rank's predicted time.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from common import Context, measure, print_table
from workloads import latent_shapes, num_patches

import packdit
from packdit.models import DiT
from packdit.packing import calibrate, plan_steps
from packdit.packing.baselines import STRATEGIES

PATCH = (1, 2, 2)
# dense bf16 tensor-core peak (TFLOP/s) by GPU name prefix, for MFU
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}


def _config(ctx: Context) -> dict:
    if ctx.is_gpu and not ctx.quick:  # STDiT-XL/2 width and head dim (72), 4 blocks to keep the run short
        return dict(model=dict(hidden_size=1152, depth=4, num_heads=16), capacity=65_536, samples=96, scale=1)
    return dict(model=dict(hidden_size=64, depth=1, num_heads=2), capacity=512, samples=48, scale=8)


def _stream(num_samples: int, scale: int) -> list[tuple[int, ...]]:
    """The default mix, spatially downscaled by ``scale`` (and temporally by ``scale // 2``) for CPU runs."""
    shapes = []
    for s in latent_shapes("video-mix", num_samples, seed=7):
        c, *thw = s
        h, w = max(2, thw[-2] // scale // 2 * 2), max(2, thw[-1] // scale // 2 * 2)
        shapes.append((c, h, w) if len(thw) == 2 else (c, max(1, thw[0] // max(1, scale // 2)), h, w))
    return shapes


def _useful_flops(lengths, hidden: int, depth: int) -> float:
    return sum(3 * depth * (24 * n * hidden**2 + 4 * n * n * hidden) for n in lengths)


def _batches(strategy: str, lengths: list[int], shapes, capacity: int, hidden: int) -> list[list[int]]:
    if strategy == "pack":
        plan = plan_steps(lengths, capacity=capacity, ranks=1, hidden_size=hidden, window=16)
        return [b for b in plan.rank_batches(0) if b]
    if strategy == "bucket":
        groups = defaultdict(list)
        for i, s in enumerate(shapes):
            groups[s].append(i)
        batches = []
        for idx in groups.values():
            per_batch = max(1, capacity // lengths[idx[0]])
            batches += [idx[j:j + per_batch] for j in range(0, len(idx), per_batch)]
        return batches
    batches, current = [], []  # pad: stream order, (count) x (longest) <= capacity
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(n, *(lengths[j] for j in current)) > capacity:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current]


def _step_inputs(batch, latents, lengths, padded: bool, device):
    """Packed tokens + layout of one batch; padded batches give every sample the batch's longest length."""
    tokens, seqs = packdit.pack([latents[i] for i in batch], PATCH)
    if not padded:
        return tokens, seqs, None
    longest = max(lengths[i] for i in batch)
    pad_seqs = packdit.PackedSeqs.from_grids([(1, 1, longest)] * len(batch), device=device)
    padded_tokens = tokens.new_zeros(longest * len(batch), tokens.shape[1])
    real = torch.cat([torch.arange(lengths[i], device=device) + k * longest for k, i in enumerate(batch)])
    padded_tokens[real] = tokens
    return padded_tokens, pad_seqs, real


def run(ctx: Context) -> list[dict]:
    cfg = _config(ctx)
    shapes = _stream(cfg["samples"], cfg["scale"])
    lengths = [num_patches(s, PATCH) for s in shapes]
    capacity = max(cfg["capacity"], max(lengths))
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(s, generator=g).to(ctx.device) for s in shapes]
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    runs = [("pad", None), ("bucket", None), ("pack", None)]
    if ctx.is_gpu:
        runs.insert(0, ("pad", "torch"))
    rows = []
    for strategy, backend in runs:
        torch.manual_seed(0)
        model = DiT(input_size=32, patch_size=PATCH, in_channels=4, learn_sigma=False, num_classes=10,
                    backend=backend, **cfg["model"]).to(ctx.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batches = _batches(strategy, lengths, shapes, capacity, cfg["model"]["hidden_size"])
        if ctx.is_gpu:
            torch.cuda.reset_peak_memory_stats()
        total_ms, padded_tokens, step_ms = 0.0, 0, []
        for batch in batches:
            tokens, seqs, real = _step_inputs(batch, latents, lengths, strategy == "pad", ctx.device)
            padded_tokens += tokens.shape[0]
            t = torch.rand(len(batch), device=ctx.device) * 1000
            y = torch.randint(0, 10, (len(batch),), device=ctx.device)

            def step():
                with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = model.forward_packed(tokens, seqs, t, y)
                    out = out if real is None else out[real]
                    loss = out.float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step_ms.append(measure(step, device=ctx.device, warmup=1, repeats=3).median_ms)
            total_ms += step_ms[-1]
        useful = sum(lengths)
        flops = _useful_flops(lengths, cfg["model"]["hidden_size"], cfg["model"]["depth"])
        row = {"strategy": strategy, "backend": model.backend or "auto", "steps": len(batches), "samples": len(lengths),
               "time_ms": total_ms, "samples_per_s": 1e3 * len(lengths) / total_ms,
               "useful_tokens_per_s": 1e3 * useful / total_ms, "padding_fraction": 1 - useful / padded_tokens,
               "useful_TFLOPs": flops / total_ms / 1e9}
        if ctx.is_gpu:
            peak = next((v for k, v in PEAK_TFLOPS.items() if ctx.env.get("gpu", "").startswith(k)), None)
            row["MFU"] = row["useful_TFLOPs"] / peak if peak else None
            row["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        if strategy == "pack":
            pack_steps = ([[lengths[i] for i in b] for b in batches], step_ms)
    base = next(r for r in rows if r["strategy"] == "pad" and r["backend"] == rows[-1]["backend"])
    for r in rows:
        r["speedup_vs_pad"] = base["time_ms"] / r["time_ms"]
    print_table(f"e2e training step ({'CPU, quick: no performance claims' if not ctx.is_gpu else ctx.env.get('gpu')};"
                f" hidden {cfg['model']['hidden_size']}, depth {cfg['model']['depth']}, capacity {capacity} tokens)",
                rows, ["strategy", "backend", "steps", "time_ms", "samples_per_s", "useful_tokens_per_s",
                       "padding_fraction", "useful_TFLOPs", "MFU", "peak_memory_GiB", "speedup_vs_pad"])
    return rows + _simulate_ranks(ctx, cfg, capacity, *pack_steps)


def _simulate_ranks(ctx: Context, cfg: dict, capacity: int, packs: list[list[int]], step_ms: list[float],
                    ranks: int = 8) -> list[dict]:
    """Calibrate the cost model on the measured pack steps, then predict multi-rank stream times."""
    distinct = {tuple(p): ms for p, ms in zip(packs, step_ms)}
    if len(distinct) < 3:
        print(f"\n(multi-rank simulation skipped: {len(distinct)} distinct packs, 3 needed to fit the cost model)")
        return []
    cal = calibrate(lambda seqlens: distinct[tuple(seqlens)] / 1e3, packs=list(distinct))
    predicted = [float(cal.model(p).sum()) * cal.seconds_per_unit * 1e3 for p in distinct]
    error = sum(abs(p - m) / m for p, m in zip(predicted, distinct.values())) / len(distinct)
    rows = [{"strategy": "cost-model", "a": cal.model.a, "b": cal.model.b, "c": cal.model.c, "R2": cal.r2,
             "mean_abs_error": error, "packs": len(distinct)}]
    lengths = [num_patches(s, PATCH) for s in _stream(cfg["samples"] * 40, cfg["scale"])]
    lengths = [n for n in lengths if n <= capacity]
    for name, strategy in STRATEGIES.items():
        plan = strategy(lengths, capacity=capacity, ranks=ranks, cost=cal.model)
        step_max = plan.bin_costs.reshape(-1, ranks).max(axis=1)
        rows.append({"strategy": f"simulated-{name}", "ranks": ranks, "samples": len(lengths),
                     "steps": plan.num_steps, "E": plan.stats.balance_efficiency,
                     "time_ms": float(step_max.sum()) * cal.seconds_per_unit * 1e3})
    pad = next(r for r in rows if r["strategy"] == "simulated-pad-to-max")
    for r in rows[1:]:
        r["speedup_vs_pad"] = pad["time_ms"] / r["time_ms"]
    print_table(f"cost model fitted on {len(distinct)} measured packs: R^2 {cal.r2:.3f}, mean |error| {error:.1%}; "
                f"predicted {ranks}-rank stream time", rows[1:], ["strategy", "samples", "steps", "E", "time_ms",
                                                                 "speedup_vs_pad"])
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "backend" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['strategy']}\n({r['backend']})" for r in rows]
    ax.bar(labels, [r["speedup_vs_pad"] for r in rows],
           color=["tab:gray", "tab:orange", "tab:green", "tab:blue"][:len(rows)])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("training-step speedup vs pad-to-max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
