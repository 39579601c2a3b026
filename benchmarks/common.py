"""Shared benchmark plumbing: environment record, timing, results files, console tables.

Every section returns a list of flat dict rows; ``write_results`` stores them as
``<out>/<device-slug>/<section>.json`` (rows + environment) and ``.csv`` (rows).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Context:
    """What a section needs to know about the run."""

    device: torch.device
    quick: bool
    env: dict
    out_dir: Path

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


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


def measure(fn: Callable[[], object], *, device: torch.device, warmup: int = 3, repeats: int = 20) -> Timing:
    """Median/p20/p80 of ``repeats`` calls after ``warmup``; CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return Timing(statistics.median(times), q[0], q[3], min(times), max(times), len(times))


def write_results(ctx: Context, section: str, rows: list[dict]) -> list[Path]:
    """``<out>/<slug>/<section>.json`` (env + rows) and ``.csv``; returns the paths written."""
    folder = ctx.out_dir / device_slug(ctx.env)
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
