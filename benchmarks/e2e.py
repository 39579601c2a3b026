"""Section ``e2e``: DiT training steps (forward + backward + AdamW) on one device, four ways to batch one stream.

The stream: samples of the default video mix, chosen as the samples of full Open-Sora bucket batches
(the first batches of a shuffled bucket sampler over 20,000 samples, skipping a bucket's last, partial
batch), so that the bucket baseline runs the full batches it runs in a long training run; every strategy
trains the same samples (none longer than ``capacity``):

* ``pad``: stream order, each batch padded to its own longest sample ((count x longest) <= capacity
  tokens; ``pad_to_batch_max``). The padded trainer runs every layer on the padded ``(B, L_max)`` tokens
  and one batched attention call in which every query row attends to its sample's real keys only (the
  key-padding mask, expressed as per-sample key lengths so that the same varlen kernel runs as for the
  packed batch; a dense masked SDPA would also compute the padded key columns).
* ``shape-buckets``: Open-Sora's bucket sampler (``shape_buckets``): samples resized/cropped to the bucket
  table of ``workloads.bucket_shape``, batch sizes for equal step time under the memory cap.
* ``shape-buckets+lookahead``: the same batches in the planner's cost-sorted order. On one device the
  order changes no work: its measured time is the same measured steps (not run twice); its gain appears
  with several ranks (simulated below).
* ``pack``: packdit's planner (``plan_steps``, window 16) packs the samples at their own shapes into steps
  of at most ``capacity`` tokens.

Before timing, each strategy's step on one of its batches (its smallest of >= 2 samples, cut to 8 samples)
is checked against the reference model (``backend="torch"``, fp32) on the same samples: the outputs at
the real tokens and every parameter gradient, with the 2x rule against the reference under the same
autocast; a strategy that disagrees is refused. Every batch then runs once untimed (compiles, autotune)
and once timed. Reported (measured, one device): steps, samples/s, useful tokens/s (tokens trained:
the bucketed ones for buckets; padding excluded), padding fraction, useful TFLOP/s, MFU (GPU), peak
memory, the fraction of samples the strategy resized or cropped, and ratios to the named baselines.
Useful FLOPs of a sample of L tokens, hidden D, depth n (training = 3 x forward):
``3 * n * (24 L D^2 + 4 L^2 D)``.

Multi-rank simulation: a step-time model ``t = c0 + c1 * tokens + c2 * pairs + c3 * samples`` (tokens
computed, attention query-key pairs, samples; non-negative least squares with an intercept) is fitted to
every measured step of every strategy (varied sizes: padded, bucketed and packed batches). Its R^2 and
mean |relative error| are reported next to every simulated number. It predicts each strategy's time over
a longer stream of the mix on 8 data-parallel ranks (a step lasts as long as its slowest rank). Simulated
speedups are printed only when R^2 >= 0.9 and the mean |error| <= 10%; otherwise the rows say why.

Sequence parallelism (measured only on a machine with >= 2 GPUs; elsewhere one row says why): one long
video (720p, 16 latent frames: 57,600 tokens) trained on a group of P = 1, 2, 4, 8 GPUs with Ulysses
(``DiT.set_sequence_parallel``, NCCL, one process per GPU). Before timing, each group size's step on a small
image + video batch is checked against the one-process fp32 reference model with the 2x rule (as above).
Reported per P: median step time (forward + backward + AdamW, the slowest rank of the group), tokens/s,
speedup over one GPU and scaling efficiency (speedup / P), and the peak memory of the busiest rank.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import socket
import tempfile
import textwrap
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import Context, OutputMismatch, print_table, refused_row, verify_outputs
from torch import nn
from workloads import bucket_shape, latent_shapes, num_patches

import packdit
from packdit._validate import mark_validated
from packdit.layout import PackedSeqs
from packdit.models import DiT
from packdit.nn import functional as PF
from packdit.packing import plan_steps
from packdit.packing.baselines import STRATEGIES, bucket_batches, pad_to_batch_max

PATCH = (1, 2, 2)
MIX = "video-mix"
POOL = 20_000  # samples the bucket sampler draws its batches from
# dense bf16 tensor-core peak (TFLOP/s) by GPU name prefix, for MFU
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}
MEASURED = ("pad", "shape-buckets", "shape-buckets+lookahead", "pack")  # reported in this order
MEASURE_ORDER = ("shape-buckets", "pack", "pad")  # the goal's comparison first, should the budget run out
BASELINES = ("shape-buckets", "pad")  # every ratio column names one of these
SIMULATED_RANKS = 8
FIT_MIN_R2, FIT_MAX_ERROR = 0.9, 0.10
VERIFY_SAMPLES = 8
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _config(ctx: Context) -> dict:
    return _gpu_config() if ctx.is_gpu and not ctx.quick else dict(
        model=dict(hidden_size=64, depth=1, num_heads=2), capacity=512, steps=3, scale=8)


def _gpu_config() -> dict:
    """STDiT-XL width and head dim (72), full attention in each of 4 blocks (to keep the run short)."""
    return dict(model=dict(hidden_size=1152, depth=4, num_heads=16), capacity=131_072, steps=8, scale=1)


def _downscale(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    """Latent shape shrunk ``scale`` x in space, ``scale // 2`` x in time (CPU runs); patchable (even H, W)."""
    if scale == 1:
        return shape
    c, *thw = shape
    h, w = max(2, thw[-2] // scale // 2 * 2), max(2, thw[-1] // scale // 2 * 2)
    return (c, h, w) if len(thw) == 2 else (c, max(1, thw[0] // (scale // 2)), h, w)


class Stream:
    """Samples at their own shapes and as the bucket table trains them: token counts, and one bucket id per
    bucket shape."""

    def __init__(self, shapes: list[tuple[int, ...]], bucket_shapes: list[tuple[int, ...]]):
        self.shapes, self.bucket_shapes = shapes, bucket_shapes
        self.lengths = np.array([num_patches(s, PATCH) for s in shapes], dtype=np.int64)
        self.bucket_lengths = np.array([num_patches(s, PATCH) for s in bucket_shapes], dtype=np.int64)
        ids = {s: k for k, s in enumerate(sorted(set(bucket_shapes)))}
        self.buckets = np.array([ids[s] for s in bucket_shapes], dtype=np.int64)

    def subset(self, index) -> Stream:
        return Stream([self.shapes[i] for i in index], [self.bucket_shapes[i] for i in index])


def _stream(num_samples: int, scale: int, seed: int) -> Stream:
    shapes = latent_shapes(MIX, num_samples, seed=seed)
    return Stream([_downscale(s, scale) for s in shapes], [_downscale(bucket_shape(s), scale) for s in shapes])


def _training_stream(cfg: dict) -> tuple[Stream, list[list[int]]]:
    """The samples of the first full bucket batches (see the module docstring) up to ``steps * capacity``
    bucketed tokens, in stream order, and those bucket batches (indices into the returned stream)."""
    pool = _stream(POOL, cfg["scale"], seed=7)
    capacity, hidden = cfg["capacity"], cfg["model"]["hidden_size"]
    fits = pool.lengths <= capacity
    batches, *_ = bucket_batches(pool.bucket_lengths, capacity=capacity, ranks=1, hidden_size=hidden,
                                 buckets=pool.buckets, split_long=True)
    full_size = {}
    for b in batches:
        key = pool.buckets[b[0]]
        full_size[key] = max(full_size.get(key, 0), len(b))
    chosen, tokens = [], 0
    for b in batches:
        if len(b) < full_size[pool.buckets[b[0]]] or not fits[b].all():
            continue
        chosen.append(b)
        tokens += int(pool.bucket_lengths[b].sum())
        if tokens >= cfg["steps"] * capacity:
            break
    index = sorted(i for b in chosen for i in b)
    position = {i: k for k, i in enumerate(index)}
    return pool.subset(index), [[position[i] for i in b] for b in chosen]


# ---------------------------------------------------------------------------------------------- batches
def _batches(strategy: str, stream: Stream, bucket_batches_: list[list[int]], capacity: int,
             hidden: int) -> list[list[int]]:
    if strategy == "pack":
        plan = plan_steps(stream.lengths, capacity=capacity, ranks=1, hidden_size=hidden, window=16)
        return [b for b in plan.rank_batches(0) if b]
    if strategy == "pad":
        return [b for b in pad_to_batch_max(stream.lengths, capacity=capacity, ranks=1,
                                            hidden_size=hidden).rank_batches(0) if b]
    return bucket_batches_


def _strategy_batches(cfg: dict, strategy: str, stream: Stream,
                      bucket_batches_: list[list[int]]) -> tuple[list[tuple[int, ...]], np.ndarray, list, list[int]]:
    """``(shapes, lengths, batches, probe)``: the samples' shapes and token counts as ``strategy`` trains them, its
    batches (indices into both) and the batch its step is verified on (the smallest of >= 2 samples, cut to
    VERIFY_SAMPLES)."""
    bucketed = strategy.startswith("shape-buckets")
    shapes = stream.bucket_shapes if bucketed else stream.shapes
    lengths = stream.bucket_lengths if bucketed else stream.lengths
    batches = _batches(strategy, stream, bucket_batches_, cfg["capacity"], cfg["model"]["hidden_size"])
    probe = min((b for b in batches if len(b) >= 2), key=lambda b: lengths[b].sum(), default=batches[0])
    return shapes, lengths, batches, probe[:VERIFY_SAMPLES]


def _features(lengths: np.ndarray, padded: bool) -> np.ndarray:
    """Step-model features of one batch: (1, tokens computed, attention query-key pairs, samples). A padded
    batch computes ``count * L_max`` tokens; each of its ``L_max`` query rows sees its sample's real keys."""
    if not len(lengths):
        return np.zeros(4)
    if padded:
        longest = lengths.max()
        return np.array([1.0, len(lengths) * longest, longest * lengths.sum(), len(lengths)], dtype=np.float64)
    return np.array([1.0, lengths.sum(), (lengths.astype(np.float64) ** 2).sum(), len(lengths)])


# ---------------------------------------------------------------------------------------------- padded trainer
@dataclasses.dataclass(frozen=True, eq=False)
class PaddedSeqs(PackedSeqs):
    """The layout of a padded ``(B, L_max)`` batch as ``B`` segments of ``L_max`` tokens (real tokens first,
    at their true positions), plus where its real tokens are: ``key_index (N_real,)`` rows of the padded
    buffer, ``key_cu_seqlens (B+1,)`` and ``key_max_seqlen`` over them (the key-padding mask)."""

    key_index: torch.Tensor | None = None
    key_cu_seqlens: torch.Tensor | None = None
    key_max_seqlen: int = 0


class PaddedAttention(nn.Module):
    """A :class:`~packdit.nn.PackedAttention`'s weights run as a padded trainer runs them: q, k, v of every
    padded row, then one varlen call in which each row attends to its sample's real keys."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, seqs: PaddedSeqs) -> torch.Tensor:
        a = self.attn
        d, hq, hk = a.head_dim, a.num_heads, a.num_kv_heads
        q, k, v = a.qkv(x).split([hq * d, hk * d, hk * d], dim=-1)
        q = a.q_norm(q.unflatten(-1, (hq, d)))
        k = a.k_norm(k.unflatten(-1, (hk, d)))[seqs.key_index]
        v = v.unflatten(-1, (hk, d))[seqs.key_index]
        out = PF.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, seqs.key_cu_seqlens, seqs.key_max_seqlen,
                                  seqs=seqs, backend=a.backend)
        return a.proj(out.flatten(1))


def _padded_inputs(tokens: torch.Tensor, seqs: PackedSeqs) -> tuple[torch.Tensor, PaddedSeqs]:
    """Packed ``tokens``/``seqs`` -> the padded batch: every sample padded with zero tokens to the longest."""
    device, lengths = tokens.device, torch.tensor(seqs.seqlens)
    count, longest = len(seqs), seqs.max_seqlen
    real = (torch.arange(longest)[None, :] < lengths[:, None]).flatten().nonzero().squeeze(1).to(device)
    padded = tokens.new_zeros(count * longest, tokens.shape[1])
    padded[real] = tokens
    positions = seqs.positions.new_zeros(count * longest, 3)
    positions[real] = seqs.positions
    layout = PaddedSeqs(
        cu_seqlens=torch.arange(count + 1, dtype=torch.int32, device=device) * longest, max_seqlen=longest,
        grid=seqs.grid, positions=positions,
        segment_ids=torch.arange(count, dtype=torch.int32, device=device).repeat_interleave(longest),
        key_index=real, key_cu_seqlens=seqs.cu_seqlens, key_max_seqlen=longest)
    mark_validated(layout)  # its segments are longer than their grids on purpose (pad rows): trusted, not checked
    return padded, layout


# ---------------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class StepInputs:
    tokens: torch.Tensor
    seqs: PackedSeqs
    t: torch.Tensor
    y: torch.Tensor
    real: torch.Tensor | None  # rows of the model output that are real tokens (None: all)


def _step_inputs(latents: list[torch.Tensor], padded: bool, seed: int) -> StepInputs:
    tokens, seqs = packdit.pack(latents, PATCH)
    gen = torch.Generator().manual_seed(seed)
    t = (torch.rand(len(latents), generator=gen) * 1000).to(tokens.device)
    y = torch.randint(0, 10, (len(latents),), generator=gen).to(tokens.device)
    if not padded:
        return StepInputs(tokens, seqs, t, y, None)
    tokens, layout = _padded_inputs(tokens, seqs)
    return StepInputs(tokens, layout, t, y, layout.key_index)


def _loss(model: nn.Module, inputs: StepInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, output at the real tokens): mean square of the real tokens' predictions (padding excluded)."""
    device_type = inputs.tokens.device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        out = model.forward_packed(inputs.tokens, inputs.seqs, inputs.t, inputs.y)
        out = out if inputs.real is None else out[inputs.real]
        return out.float().square().mean(), out


def _model(cfg: dict, device, *, padded: bool, backend: str | None = None) -> nn.Module:
    """The benchmark DiT with PyTorch's default layer init instead of the official one (which zeroes the adaLN
    and output layers: zero outputs, most gradients zero, and an attention branch too small to check);
    ``padded`` swaps in the padded trainer's attention."""
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=PATCH, in_channels=4, learn_sigma=False, num_classes=10,
                class_dropout_prob=0.0, backend=backend, **cfg["model"])
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if padded:
        for block in model.blocks:
            block.attn = PaddedAttention(block.attn)
    return model.to(device)


def _verify(ctx: Context, cfg: dict, strategy: str, model: nn.Module, latents: list[torch.Tensor],
            dtype: torch.dtype) -> float:
    """Check one step of ``model`` on ``latents`` against the fp32 reference model (module docstring)."""
    padded = strategy == "pad"
    got_inputs = _step_inputs(latents, padded, seed=0)
    ref_inputs = _step_inputs(latents, False, seed=0)
    reference = _reference_model(cfg, model)
    results = []
    for net, inputs, run_dtype in ((model, got_inputs, dtype), (reference, ref_inputs, torch.float32),
                                   (reference, ref_inputs, dtype)):
        net.zero_grad(set_to_none=True)
        loss, out = _loss(net, inputs, run_dtype)
        loss.backward()
        results.append([out.detach()] + [p.grad for _, p in _named_parameters(net)])
        net.zero_grad(set_to_none=True)
    names = ["output"] + [name for name, _ in _named_parameters(model)]
    return verify_outputs(f"e2e/{strategy}", results[0], results[1], tol=TOLERANCE[dtype],
                          peer=results[2] if dtype != torch.float32 else None, names=names)


def _named_parameters(model: nn.Module):
    """Parameters in a naming shared by the packed and the padded model (the wrapper's ``.attn`` dropped)."""
    return sorted((name.replace("attn.attn.", "attn."), p) for name, p in model.named_parameters())


def _reference_model(cfg: dict, model: nn.Module) -> nn.Module:
    ref = _model(cfg, next(model.parameters()).device, padded=False, backend="torch")
    ref.load_state_dict(dict(_named_parameters(model)), strict=False)
    return ref


def _useful_flops(lengths, hidden: int, depth: int) -> float:
    return sum(3 * depth * (24 * n * hidden**2 + 4 * n * n * hidden) for n in lengths)


def _measure_strategy(ctx: Context, cfg: dict, strategy: str, stream: Stream, bucket_batches_: list[list[int]],
                      dtype) -> tuple[dict, list]:
    """Verify, warm up, time every batch once; returns the measured row and the (features, ms) of its steps."""
    hidden, depth = cfg["model"]["hidden_size"], cfg["model"]["depth"]
    shapes, lengths, batches, probe = _strategy_batches(cfg, strategy, stream, bucket_batches_)
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(s, generator=gen).to(ctx.device) for s in shapes]
    padded = strategy == "pad"
    model = _model(cfg, ctx.device, padded=padded)
    row = {"kind": "measured", "strategy": strategy, "backend": model.backend, "steps": len(batches),
           "samples": len(shapes), "changed_samples": float(np.mean([a != b for a, b in zip(stream.shapes, shapes)]))}
    try:
        row["rel_err"] = _verify(ctx, cfg, strategy, model, [latents[i] for i in probe], dtype)
    except OutputMismatch as e:
        return refused_row(row, e), []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def batch(k: int) -> StepInputs:  # packed anew for every step, as the data loader hands each step a new batch
        return _step_inputs([latents[i] for i in batches[k]], padded, seed=k)

    def step(batch_inputs):
        loss, _ = _loss(model, batch_inputs, dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(len(batches) if ctx.is_gpu else 1):  # compiles and autotunes, untimed
        step(batch(k))
    if ctx.is_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_ms = [_time_once(ctx, step, batch(k)) for k in range(len(batches))]
    steps = [(_features(lengths[b], padded), ms) for b, ms in zip(batches, step_ms)]
    computed = int(sum(_features(lengths[b], padded)[1] for b in batches))
    useful = int(sum(lengths))
    total_ms = sum(step_ms)
    row.update(time_ms=total_ms, samples_per_s=1e3 * len(shapes) / total_ms,
               useful_tokens_per_s=1e3 * useful / total_ms, useful_tokens=useful, computed_tokens=computed,
               padding_fraction=1 - useful / computed,
               useful_TFLOPs=_useful_flops(lengths, hidden, depth) / total_ms / 1e9)
    if ctx.is_gpu:
        peak = next((v for k, v in PEAK_TFLOPS.items() if ctx.env.get("gpu", "").startswith(k)), None)
        row["MFU"] = row["useful_TFLOPs"] / peak if peak else None
        row["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row, steps


def _time_once(ctx: Context, fn, *args) -> float:
    if ctx.is_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def _add_ratios(rows: list[dict], prefix: str = "") -> None:
    """``<metric>_vs_<baseline>`` columns: each row's samples/s and useful tokens/s over the named baseline's."""
    by_name = {r["strategy"].removeprefix(prefix): r for r in rows}
    for baseline in BASELINES:
        base = by_name.get(baseline)
        if base is None or "useful_tokens_per_s" not in base:
            continue
        for r in rows:
            if "useful_tokens_per_s" in r:
                r[f"useful_tokens_per_s_vs_{baseline}"] = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
                r[f"samples_per_s_vs_{baseline}"] = r["samples_per_s"] / base["samples_per_s"]


def packdit_calls() -> list[tuple[str, Callable[[], None]]]:
    """``(label, call)``: for each measured strategy, the packdit model's forward + backward (bf16 autocast,
    ``backend="triton"``) on its verified probe batch and on every batch the GPU run trains, on CPU tensors: the
    Triton launches of the GPU run, for ``precompile.py`` to record. The model keeps one block: its blocks are
    alike (full attention, one width), so the others repeat the first one's launches."""
    cfg = _gpu_config()
    cfg["model"]["depth"] = 1
    stream, bucket_batches_ = _training_stream(cfg)
    calls = []
    for strategy in MEASURE_ORDER:
        shapes, _, batches, probe = _strategy_batches(cfg, strategy, stream, bucket_batches_)
        model = functools.cache(functools.partial(_model, cfg, "cpu", padded=strategy == "pad", backend="triton"))
        for k, samples in [("probe", probe), *enumerate(batches)]:
            calls.append((f"e2e {strategy} step {k}",
                          functools.partial(_run_step, model, [shapes[i] for i in samples], strategy == "pad")))
    return calls


def _run_step(model: Callable[[], nn.Module], shapes: list[tuple[int, ...]], padded: bool) -> None:
    net = model()
    loss, _ = _loss(net, _step_inputs([torch.zeros(s) for s in shapes], padded, seed=0), torch.bfloat16)
    loss.backward()
    net.zero_grad(set_to_none=True)


def run(ctx: Context) -> list[dict]:
    cfg = _config(ctx)
    stream, bucket_batches_ = _training_stream(cfg)
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    hidden = cfg["model"]["hidden_size"]
    measured, steps = {}, []
    for strategy in MEASURE_ORDER:
        if ctx.out_of_time():
            measured[strategy] = {"kind": "measured", "strategy": strategy, "note": "skipped: time budget spent"}
            continue
        measured[strategy], strategy_steps = _measure_strategy(ctx, cfg, strategy, stream, bucket_batches_, dtype)
        steps += strategy_steps
    if "time_ms" in measured["shape-buckets"]:
        measured["shape-buckets+lookahead"] = {
            **measured["shape-buckets"], "strategy": "shape-buckets+lookahead",
            "note": "the shape-buckets batches reordered: the same measured steps (order changes no work on one "
                    "device)"}
    rows = [measured[s] for s in MEASURED if s in measured]
    _add_ratios(rows)
    where = ctx.env.get("gpu") if ctx.is_gpu else "CPU, quick: no performance claims"
    print_table(f"e2e training steps, measured on one device ({where}; hidden {hidden}, depth "
                f"{cfg['model']['depth']}, capacity {cfg['capacity']} tokens, {len(stream.shapes)} samples)", rows,
                ["strategy", "steps", "samples_per_s", "useful_tokens_per_s", "padding_fraction", "changed_samples",
                 "MFU", "peak_memory_GiB", "useful_tokens_per_s_vs_shape-buckets", "useful_tokens_per_s_vs_pad",
                 "rel_err", "refused"])
    fit = fit_step_model(np.array([f for f, _ in steps]), np.array([ms for _, ms in steps]))
    rows += simulated_rows(fit, _stream(40 * len(stream.shapes), cfg["scale"], seed=11), cfg)
    return rows + sequence_parallel_rows(ctx, cfg, dtype)


# ---------------------------------------------------------------------------------------------- simulation
@dataclasses.dataclass(frozen=True)
class StepModel:
    """``ms = coef . (1, tokens, pairs, samples)`` fitted to measured steps; ``trusted`` when good enough to
    simulate speedups with (R^2 >= 0.9 and mean |relative error| <= 10%)."""

    coef: np.ndarray
    r2: float
    mean_abs_error: float
    num_steps: int

    @property
    def trusted(self) -> bool:
        return self.r2 >= FIT_MIN_R2 and self.mean_abs_error <= FIT_MAX_ERROR

    def why_untrusted(self) -> str:
        return (f"no simulated speedup: the step-time model fitted on {self.num_steps} measured steps has R^2 "
                f"{self.r2:.3f} (needs >= {FIT_MIN_R2}) and mean |error| {self.mean_abs_error:.1%} "
                f"(needs <= {FIT_MAX_ERROR:.0%})")

    def predict(self, features: np.ndarray) -> np.ndarray:
        return features @ self.coef


def fit_step_model(features: np.ndarray, ms: np.ndarray) -> StepModel:
    """Least squares of ``ms`` on ``features (n, 4)`` with every coefficient >= 0: columns whose coefficient
    comes out negative are dropped one at a time (most negative first) and the rest refitted."""
    features, ms = np.asarray(features, np.float64).reshape(-1, 4), np.asarray(ms, np.float64)
    if len(ms) < 2:
        return StepModel(np.zeros(4), -math.inf, math.inf, len(ms))
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    active = list(range(4))
    while True:
        sol, *_ = np.linalg.lstsq(features[:, active] / scale[active], ms, rcond=None)
        if (sol >= 0).all() or len(active) == 1:
            break
        del active[int(np.argmin(sol))]
    coef = np.zeros(4)
    coef[active] = np.clip(sol, 0, None) / scale[active]
    predicted = features @ coef
    total = ((ms - ms.mean()) ** 2).sum()
    r2 = 1 - float(((ms - predicted) ** 2).sum() / total) if total > 0 else 1.0
    return StepModel(coef, r2, float(np.mean(np.abs(predicted - ms) / ms)), len(ms))


def simulated_rows(fit: StepModel, stream: Stream, cfg: dict, ranks: int = SIMULATED_RANKS) -> list[dict]:
    """Predicted time of ``stream`` on ``ranks`` ranks per strategy (sum over steps of the slowest rank)."""
    capacity, hidden = cfg["capacity"], cfg["model"]["hidden_size"]
    label = f"simulated, {ranks} ranks (step model R^2 {fit.r2:.3f}, mean |error| {fit.mean_abs_error:.1%})"
    keep = stream.lengths <= capacity
    stream = stream.subset(np.flatnonzero(keep))
    rows = []
    for name in ("pad-to-batch-max", "shape-buckets", "shape-buckets+lookahead", "navit-greedy", "per-step-lpt",
                 "lookahead"):
        bucketed = name.startswith("shape-buckets")
        lengths = stream.bucket_lengths if bucketed else stream.lengths
        extra = {"buckets": stream.buckets} if bucketed else {}
        plan = STRATEGIES[name](lengths, capacity=capacity, ranks=ranks, hidden_size=hidden, **extra)
        bin_ms = np.array([fit.predict(_features(lengths[b], name == "pad-to-batch-max")) if b else 0.0
                           for step in plan.steps for b in step]).reshape(-1, ranks)
        busy = float(bin_ms.max(axis=1).sum())
        row = {"kind": label, "strategy": name.replace("pad-to-batch-max", "pad"), "ranks": ranks,
               "samples": len(lengths), "steps": plan.num_steps, "R2": fit.r2, "mean_abs_error": fit.mean_abs_error,
               "E_model": float(bin_ms.sum() / (ranks * busy)) if busy > 0 else math.nan}
        if fit.trusted:
            row.update(time_ms=busy, samples_per_s=1e3 * len(lengths) / busy,
                       useful_tokens_per_s=1e3 * float(lengths.sum()) / busy)
        else:
            row["note"] = fit.why_untrusted()
        rows.append(row)
    _add_ratios(rows)
    terms = " + ".join(f"{c:.3g}*{n}" for c, n in zip(fit.coef, ("1", "tokens", "pairs", "samples")))
    print(f"\nstep-time model ms = {terms} fitted on {fit.num_steps} measured steps: R^2 {fit.r2:.3f}, "
          f"mean |error| {fit.mean_abs_error:.1%}")
    if fit.trusted:
        print_table(label, rows, ["strategy", "samples", "steps", "E_model", "time_ms", "useful_tokens_per_s",
                                  "useful_tokens_per_s_vs_shape-buckets", "useful_tokens_per_s_vs_pad"])
    else:
        print(f"{label}: {fit.why_untrusted()}")
    return rows


# ---------------------------------------------------------------------------------------------- sequence parallel
SP_GROUP_SIZES = (1, 2, 4, 8)
SP_LONG_VIDEO = (4, 16, 90, 160)           # 720p through a 4x8x8 VAE, 16 latent frames: 57,600 tokens
SP_VERIFY = ((4, 2, 16, 24), (4, 16, 16))  # a video and an image of 192 + 64 tokens: uneven shards
SP_STEPS = 5
SP_TIMEOUT = timedelta(minutes=5)


def sequence_parallel_rows(ctx: Context, cfg: dict, dtype: torch.dtype) -> list[dict]:
    """The sequence-parallel rows (module docstring): measured with >= 2 GPUs, else one row saying why."""
    gpus = torch.cuda.device_count() if ctx.is_gpu else 0
    if gpus < 2 or ctx.out_of_time():
        why = f"needs >= 2 GPUs, this machine has {gpus}" if gpus < 2 else "time budget spent"
        return [{"kind": "sequence-parallel", "note": f"not measured: {why}"}]
    sizes = tuple(p for p in SP_GROUP_SIZES if p <= gpus)
    rows = measure_sequence_parallel(sizes, "nccl", cfg, SP_LONG_VIDEO, SP_STEPS, dtype)
    print_table(f"e2e sequence parallelism: one {rows[0]['tokens']}-token video on groups of GPUs "
                f"({ctx.env.get('gpu')}, Ulysses, NCCL)", rows,
                ["gpus", "time_ms", "tokens_per_s", "speedup", "efficiency", "peak_memory_GiB", "rel_err", "refused"])
    return rows


def measure_sequence_parallel(sizes: tuple[int, ...], backend: str, cfg: dict, long_video: tuple[int, ...],
                              steps: int, dtype: torch.dtype) -> list[dict]:
    """One process per rank (``max(sizes)`` of them; GPU r for rank r with NCCL, the CPU with gloo): for each group
    size P, ranks 0..P-1 verify and time training steps of ``long_video`` together. Rows of rank 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        mp.spawn(_sp_worker, args=(max(sizes), port, backend, cfg, sizes, long_video, steps, str(dtype), str(out)),
                 nprocs=max(sizes), join=True)
        rows = json.loads(out.read_text())
    alone = next((r["time_ms"] for r in rows if r["gpus"] == 1 and "time_ms" in r), None)
    for r in rows:
        if "time_ms" in r and alone:
            r["speedup"] = alone / r["time_ms"]
            r["efficiency"] = r["speedup"] / r["gpus"]
    return rows


def _sp_worker(rank: int, world: int, port: int, backend: str, cfg: dict, sizes: tuple[int, ...],
               long_video: tuple[int, ...], steps: int, dtype_name: str, out: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=SP_TIMEOUT, device_id=device if device.type == "cuda" else None)
    try:
        groups = {p: dist.new_group(list(range(p))) for p in sizes if p > 1}  # every rank creates every group
        dtype = getattr(torch, dtype_name.removeprefix("torch."))
        gen = torch.Generator().manual_seed(0)
        verify = [torch.randn(s, generator=gen).to(device) for s in SP_VERIFY]
        inputs = _step_inputs([torch.randn(long_video, generator=gen).to(device)], padded=False, seed=0)
        rows = []
        for size in sizes:
            if rank < size:  # the same weights on every rank of the group: a fresh model from the same seed
                model = _model(cfg, device, padded=False)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                model.set_sequence_parallel(groups.get(size))
                row = {"kind": "sequence-parallel", "gpus": size, "tokens": inputs.seqs.num_tokens,
                       "backend": model.backend}
                try:
                    row["rel_err"] = _verify(None, cfg, f"sequence-parallel/{size}", model, verify, dtype)
                except OutputMismatch as e:
                    row = refused_row(row, e)
                else:
                    row.update(_time_sp_steps(model, optimizer, inputs, dtype, steps, groups.get(size), device))
                rows.append(row)
            dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        # Every rank tears the group down together: a gloo rank destroying its group while a peer still holds
        # its own (rank 0 writing the rows) can end in std::terminate.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _time_sp_steps(model: nn.Module, optimizer, inputs: StepInputs, dtype: torch.dtype, steps: int, group,
                   device: torch.device) -> dict:
    """Median of ``steps`` timed training steps after an untimed one, each the slowest rank of ``group``'s, and
    the largest peak memory of its ranks."""
    ctx = Context(device=device, quick=False, env={}, out_dir=Path("."))

    def step():
        loss, _ = _loss(model, inputs, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # compiles and autotunes, untimed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if group is not None:
            dist.barrier(group=group)
        times.append(_time_once(ctx, step))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    slowest = torch.tensor([float(np.median(times)), peak], device=device)
    if group is not None:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    time_ms, peak = slowest.tolist()
    return {"time_ms": time_ms, "tokens_per_s": 1e3 * inputs.seqs.num_tokens / time_ms, "peak_memory_GiB": peak}


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("kind") == "measured" and "useful_tokens_per_s" in r]
    simulated = [r for r in rows if str(r.get("kind", "")).startswith("simulated")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.bar([r["strategy"] for r in measured], [r["useful_tokens_per_s"] for r in measured], color="tab:blue")
    ax1.set_ylabel("useful tokens/s")
    ax1.set_title("measured, one device", fontsize=9)
    ax1.tick_params(axis="x", labelsize=7, rotation=15)
    if simulated and "useful_tokens_per_s" in simulated[0]:
        ax2.bar([r["strategy"] for r in simulated], [r["useful_tokens_per_s"] for r in simulated], color="tab:gray")
        ax2.set_ylabel("useful tokens/s (predicted)")
        ax2.tick_params(axis="x", labelsize=7, rotation=15)
    elif simulated:
        ax2.text(0.5, 0.5, textwrap.fill(simulated[0]["note"], 60), ha="center", va="center", fontsize=8)
        ax2.set_axis_off()
    ax2.set_title(simulated[0]["kind"] if simulated else "simulated: none", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
