"""Compile the Triton kernels of benchmark sections before they run, on every core (``make gpu-check`` does).

A section compiles each kernel specialisation the first time it launches it, one after another in its own
process: 0.8-1.6 s per attention kernel for sm_90 on one core of a 2-core CPU machine, and the attention section's
GPU cases launch a few hundred. This tool records those launches without running anything
(``tests/triton_aot.py``: each section's ``packdit_calls()`` on CPU tensors, Triton's own argument binder
specialising every launch as the GPU launch will) and compiles them in worker processes into Triton's cache,
with exactly the inputs Triton's JIT passes to ``triton.compile`` (``triton_aot.ExactCompile``): the section's
launches then load them from the cache. A launch the recording missed compiles when it runs, as without this
tool; a worker that would file a kernel under another cache key than the recording fails loudly. The recording
leaves PyTorch's floating-point math on large tensors uninitialised (``triton_aot.uninitialized_math``; the
launches depend on shapes, strides and host-side schedules only), so that e2e's 41 training steps at GPU sizes
record in ~16 s on two cores.

    python benchmarks/precompile.py                          # every section's, for this machine's GPU
    python benchmarks/precompile.py --only attention --workers 8
    python benchmarks/precompile.py --capture-only --arch 90 # count them on a CPU-only machine
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import triton_aot  # noqa: E402

SECTIONS = ("attention", "mlp", "norm", "rope", "e2e")  # the sections whose modules define packdit_calls()


def _device_arch() -> int | None:
    """The CUDA device's compute capability as an int (90 for sm_90), None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def capture(sections: list[str], arch: int) -> tuple[list[triton_aot.ExactCompile], list[str]]:
    """``(compiles, failures)``: the compiles the GPU runs of ``sections`` make for ``arch``, each once, in the order
    they first launch, and a message per section whose recording failed (what it recorded before is kept; the
    other sections are recorded all the same)."""
    failures = []
    with triton_aot.capturing((arch,)) as recorder, triton_aot.uninitialized_math():
        for name in sections:
            try:
                for _, call in tqdm(importlib.import_module(name).packdit_calls(), desc=f"recording {name}",
                                    file=sys.stdout):
                    call()
            except Exception as e:  # noqa: BLE001 -- report it, record the other sections
                failures.append(f"recording {name}: {type(e).__name__}: {str(e).strip()[:300]}")
    return list(recorder.exact.values()), failures


def compile_all(jobs: list[triton_aot.ExactCompile], workers: int) -> list[str]:
    """Compile ``jobs`` into Triton's cache in ``workers`` processes; returns the failures' messages."""
    from triton import knobs

    failures = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=triton_aot.init_worker,
                                                initargs=(knobs.cache.dir,)) as pool:
        futures = {pool.submit(triton_aot.compile_exact, job): job for job in jobs}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="compiling",
                           file=sys.stdout):
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 -- report every failure, keep compiling the others
                failures.append(f"{futures[future].kernel}: {str(e).strip().splitlines()[-1][:300]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="compiling processes (default: all cores)")
    parser.add_argument("--arch", type=int, default=None,
                        help="target compute capability, 90 for sm_90 (default: this machine's GPU)")
    parser.add_argument("--capture-only", action="store_true", help="record and count the compiles, compile none")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; expected some of {list(SECTIONS)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter compiles nothing (unset it)")
    arch = args.arch if args.arch is not None else _device_arch()
    if arch is None:
        parser.error("--arch: no CUDA device here to take it from; name the target, e.g. --arch 90")

    started = time.perf_counter()
    jobs, failures = capture(sections, arch)
    print(f"precompile: {len(jobs)} kernel specialisations of {', '.join(sections)} for sm_{arch}, "
          f"recorded in {time.perf_counter() - started:.1f} s")
    if not args.capture_only and jobs:
        started = time.perf_counter()
        compile_failures = compile_all(jobs, args.workers)
        print(f"precompile: {len(jobs) - len(compile_failures)} of {len(jobs)} compiled in "
              f"{time.perf_counter() - started:.1f} s by {args.workers} processes")
        failures += compile_failures
    for failure in failures:
        print(f"precompile: FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
