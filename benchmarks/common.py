"""Shared benchmark plumbing: environment record, output verification, timing, results files, tables.

Every section returns a list of flat dict rows; ``write_results`` stores them as
``<out>/<device-slug>/<section>.json`` (rows + environment) and ``.csv`` (rows).

Before a section times an implementation it checks that it computes what its reference computes
(:func:`verify_outputs`, with :func:`forward_and_grads` for the gradients of a timed backward). An
implementation that disagrees is not timed: the section records a row with a ``refused`` field (the
mismatch message) instead, and ``run.py`` exits non-zero when any row was refused.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Context:
    """What a section needs to know about the run; ``deadline`` (``time.monotonic()``) ends its soft budget."""

    device: torch.device
    quick: bool
    env: dict
    out_dir: Path
    deadline: float | None = None

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        """Seconds left of the section's budget (inf without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self, reserve: float = 0.0) -> bool:
        """True once fewer than ``reserve`` seconds of the budget are left: start no new case."""
        return self.time_left() < reserve


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """GPU/CPU name, driver, CUDA, torch, triton, packdit versions and commit."""
    import packdit
    from packdit import _ext

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packdit": packdit.__version__,
        "commit": _git_commit(),
        "native_extension": _ext.load() is not None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_sms"] = props.multi_processor_count
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    return env


def device_slug(env: dict) -> str:
    """``nvidia-h100-80gb-hbm3`` for a GPU, ``cpu-x86_64`` for the CPU: the results folder name."""
    name = env.get("gpu") or f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class OutputMismatch(AssertionError):
    """An implementation's outputs (or gradients) differ from its reference: it must not be timed."""


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius, fp32 accumulation; absolute when expected is 0);
    inf when actual holds a NaN/inf where expected is finite."""
    a, e = actual.detach(), expected.detach()
    if torch.equal(a, e):
        return 0.0
    if a.is_floating_point() and bool((torch.isfinite(e) & ~torch.isfinite(a)).any()):
        return math.inf
    e = e.float()
    diff = torch.linalg.vector_norm(torch.nan_to_num(a.float() - e)).item()
    scale = torch.linalg.vector_norm(torch.nan_to_num(e)).item()
    return diff / scale if scale > 0 else diff


def verify_outputs(label: str, actual: Tensor | Sequence[Tensor | None], expected: Tensor | Sequence[Tensor | None],
                   *, tol: float, peer: Tensor | Sequence[Tensor | None] | None = None,
                   names: Sequence[str] | None = None) -> float:
    """Refuse to time ``label`` unless it computes what ``expected`` holds; returns the largest relative error.

    ``actual``, ``expected`` and ``peer`` are one tensor or equally long sequences of tensors in the same order
    (e.g. ``[out, dq, dk, dv]`` from :func:`forward_and_grads`); ``None`` entries must be ``None`` in both.
    ``expected`` is the reference, ideally in higher precision (fp32/fp64 on upcast inputs). For every tensor
    i the relative error ``err_i = ||actual_i - expected_i|| / ||expected_i||`` (Frobenius norm; absolute when
    ``expected_i`` is all zeros, inf for a NaN/inf where the reference is finite) must satisfy

        err_i <= tol                              (no peer)
        err_i <= 2 * err(peer_i) + tol            (peer: the same outputs from a trusted implementation in the
                                                    precision under test -- the flash-attention 2x rule)

    Raises :class:`OutputMismatch` naming the label, the tensor (``names[i]`` or its index), both errors, the
    shapes, and the largest elementwise difference. Typical ``tol``: 1e-4 for fp32 kernels against an fp64
    reference, 2e-2 for bf16 without a peer, 2e-3 with one.
    """
    single = isinstance(actual, Tensor)
    actual, expected = ([actual], [expected]) if single else (list(actual), list(expected))
    peers = [None] * len(expected) if peer is None else ([peer] if isinstance(peer, Tensor) else list(peer))
    names = list(names) if names is not None else [f"output {i}" for i in range(len(expected))]
    if not len(actual) == len(expected) == len(peers) == len(names):
        raise ValueError(f"{label}: {len(actual)} outputs, {len(expected)} references, {len(peers)} peer outputs "
                         f"and {len(names)} names; expected equal counts")
    worst = 0.0
    for name, got, want, ref_peer in zip(names, actual, expected, peers):
        if got is None or want is None:
            if got is not want:
                raise OutputMismatch(f"{label}: {name} is {'missing' if got is None else 'unexpected'}; not timed")
            continue
        if got.shape != want.shape:
            raise OutputMismatch(f"{label}: {name} has shape {tuple(got.shape)}, the reference {tuple(want.shape)}; "
                                 "not timed")
        err = _relative_error(got, want)
        allowed = tol + (2 * _relative_error(ref_peer, want) if ref_peer is not None else 0.0)
        if not err <= allowed:
            max_diff = (got.detach().float() - want.detach().float()).abs().nan_to_num(math.inf).max().item() \
                if got.numel() else 0.0
            raise OutputMismatch(f"{label}: {name} differs from the reference: relative error {err:.3g} > allowed "
                                 f"{allowed:.3g} (max |diff| {max_diff:.3g}, shape {tuple(got.shape)}); not timed")
        worst = max(worst, err)
    return worst


def forward_and_grads(fn: Callable[..., Tensor], inputs: Sequence[Tensor], grad_out: Tensor, *args,
                      dtype: torch.dtype | None = None) -> list[Tensor]:
    """``[out, d inputs[0], d inputs[1], ...]`` of ``out = fn(*inputs, *args)`` and ``out.backward(grad_out)``.

    The inputs are copied to fresh leaves (cast to ``dtype`` first when given, e.g. ``torch.float64`` for a
    reference); the floating-point ones get gradients, the others get ``None``. The results are detached.
    """
    leaves = []
    for x in inputs:
        x = x.detach().to(dtype) if dtype is not None and x.is_floating_point() else x.detach()
        leaves.append(x.clone().requires_grad_(x.is_floating_point()))
    out = fn(*leaves, *args)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad if x.is_floating_point() else None for x in leaves]


def refused_row(base: dict, error: OutputMismatch) -> dict:
    """The row a section records instead of timings when :func:`verify_outputs` refused an implementation."""
    print(f"  REFUSED {error}")
    return {**base, "refused": str(error)}


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def row(self) -> dict:
        return dataclasses.asdict(self)


MAX_REPEATS = 50  # measure(min_total_ms=...): the most calls it times


def measure(fn: Callable[..., object], *, device: torch.device, warmup: int = 3, repeats: int = 20,
            setup: Callable[[], object] | None = None, min_total_ms: float = 0.0) -> Timing:
    """Median/p20/p80 of ``repeats`` calls after ``warmup``; CUDA events on a GPU, perf_counter on the CPU.
    ``setup``: run untimed before each call, its result passed to ``fn`` (a fresh autograd graph for a backward:
    a graph retained across calls is refused by ``torch.compile``'s backward, which donates its buffers).
    ``min_total_ms``: more calls, up to MAX_REPEATS, until the timed ones add up to it (short calls, whose
    medians spread most, get more samples at little cost)."""
    def prepared() -> Callable[[], object]:
        if setup is None:
            return fn
        arg = setup()
        return lambda: fn(arg)

    for _ in range(warmup):
        prepared()()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
    times = []
    while len(times) < repeats or (sum(times) < min_total_ms and len(times) < MAX_REPEATS):
        call = prepared()
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return Timing(statistics.median(times), q[0], q[3], min(times), max(times), len(times))


def kernel_times(fn: Callable[[], object], *, device: torch.device, top: int = 8) -> dict[str, float]:
    """Milliseconds per kernel of one (warm) call of ``fn`` under ``torch.profiler``, the ``top`` longest: device
    kernels on a GPU (their sum against the call's event time is the host overhead a lone call pays), top-level
    operators on the CPU. Names are cut to 48 characters (C++ template kernels have very long ones)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    for event in prof.events():
        if (event.device_type == DeviceType.CUDA) if gpu else event.cpu_parent is None:
            name = event.name[:48]
            totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us() / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1])[:top])


def results_dir(ctx: Context, slug: str | None = None) -> Path:
    """``<out>/<slug>`` for a full run, ``<out>/<slug>-quick`` for a quick one (git ignores those). ``slug``: the
    results folder, default the device's (``device_slug``); a static section names its own."""
    return ctx.out_dir / ((slug or device_slug(ctx.env)) + ("-quick" if ctx.quick else ""))


def write_results(ctx: Context, section: str, rows: list[dict], slug: str | None = None) -> list[Path]:
    """``<results_dir>/<section>.json`` (env + rows) and ``.csv``; returns the paths written."""
    folder = results_dir(ctx, slug)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{section}.json", folder / f"{section}.csv"
    json_path.write_text(json.dumps({"section": section, "quick": ctx.quick, "env": ctx.env, "rows": rows}, indent=2))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from tabulate import tabulate

    print(f"\n## {title}")
    print(tabulate([[r.get(c, "") for c in columns] for r in rows], headers=columns, floatfmt=".3g"))
