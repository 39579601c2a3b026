"""``benchmarks/precompile.py`` compiles exactly what a GPU run's launches look up in Triton's cache.

The tool records a section's launches on CPU tensors and compiles each with the inputs Triton's JIT computes for
it (``triton_aot.ExactCompile``). Whether the JIT then finds them is checked here without a GPU: the same
launches go through Triton's own JIT path with a stand-in driver for an sm_90 device (``triton_aot.jit_lookups``),
which loads each kernel from the cache or compiles it, and reports what it compiled. The scenarios cover the
autotuned forward in every configuration (128-row tiles as one program or two of 64 rows), the QK-norm / RoPE
kernel, the attention backward, the GEMM's tensor descriptors (whose block shapes the autotuner's pre-hook sets
per configuration) and the norm kernels. Compiles run in a worker process with a fresh Triton cache (the test
session runs the interpreter).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_launches import COVERAGE, PRODUCTION, jit_misses, recorded_keys
from triton_aot import ExactCompile, Workers, compile_exact

from packdit.ops.mlp import _TMA_TILE_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = [s for s in (*PRODUCTION, *COVERAGE)
             if s.name in ("attention 1152/16 rope full long bf16", "mlp 1152 bf16", "norm 64 layer affine bf16")]


@pytest.fixture
def fresh_cache_worker(tmp_path):
    with Workers(1, str(tmp_path / "triton-cache"), archs=(90,)) as workers:
        yield workers.pool


def test_scenarios_exist():
    assert len(SCENARIOS) == 3


def test_the_jit_finds_every_precompiled_kernel(fresh_cache_worker):
    assert fresh_cache_worker.submit(jit_misses, SCENARIOS).result() == []


def test_the_jit_reports_what_it_compiles(fresh_cache_worker):
    """Without the precompile the same lookups compile: the check above can fail."""
    misses = fresh_cache_worker.submit(jit_misses, SCENARIOS[2:], precompile=False).result()
    assert any(name.startswith("_modulated_norm_fwd") for name in misses), misses


def test_a_compile_under_another_key_is_refused(fresh_cache_worker):
    job = ExactCompile("packdit.ops.modulate:_modulated_norm_fwd", 90, {}, {}, {}, {}, key="recorded elsewhere")
    with pytest.raises(RuntimeError, match="recorded elsewhere"):
        fresh_cache_worker.submit(compile_exact, job).result()


def _python_without_interpreter(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository root with real Triton targets (the test session runs the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_precompile_records_the_sections_launches():
    done = _python_without_interpreter("benchmarks/precompile.py", "--capture-only", "--arch", "90", "--only", "mlp")
    recorded = re.search(r"^precompile: (\d+) kernel specialisations of mlp for sm_90", done.stdout, flags=re.M)
    assert recorded, done.stdout[-2000:]
    assert int(recorded.group(1)) >= len(_TMA_TILE_CONFIGS)  # at least every configuration of one GEMM launch


def test_uninitialized_math_records_the_launches_computed_math_records(fresh_cache_worker):
    """A training step of STDiT-XL (spatial and temporal attention, QK-norm, RoPE, fused MLP, modulated norms)
    records the same compiles with every floating-point result left uninitialised (``triton_aot.
    uninitialized_math``, as ``precompile.py`` captures) as with PyTorch's math computed."""
    scenario = next(s for s in PRODUCTION if s.name == "STDiT-XL/2 rope video")
    computed = fresh_cache_worker.submit(recorded_keys, [scenario]).result()
    uninitialized = fresh_cache_worker.submit(recorded_keys, [scenario], uninitialized_from=1).result()
    assert len(computed) > 10
    assert uninitialized == computed


def test_uninitialized_math_keeps_what_launches_depend_on():
    """Views keep their storage offsets, integer and boolean results and value-dependent shapes are computed,
    floating-point results have the layout PyTorch gives them, in-place updates of large float tensors are
    skipped."""
    import torch
    from triton_aot import uninitialized_math

    x = torch.ones(64, 72)
    w = torch.ones(100, 72)
    with uninitialized_math(min_elements=1024):
        view = x[:, 8:]
        assert view.data_ptr() == x.data_ptr() + 8 * x.element_size() and view.stride() == (72, 1)
        assert torch.equal(torch.arange(5).cumsum(0), torch.tensor([0, 1, 3, 6, 10]))
        assert torch.equal(torch.tensor([0, 3, 0, 2]).nonzero().flatten(), torch.tensor([1, 3]))
        assert int((x == 1).sum()) == x.numel()  # a mask of a large float tensor
        product = torch.nn.functional.linear(x, w)
        assert product.shape == (64, 100) and product.stride() == (100, 1) and product.dtype == x.dtype
        x.add_(1)
        small = torch.ones(4, 4).add_(1)  # fewer than min_elements: computed
    assert torch.equal(x, torch.ones(64, 72)) and torch.equal(small, torch.full((4, 4), 2.0))


def test_a_section_that_fails_to_record_leaves_the_others_recorded():
    script = """
import sys, types
sys.path[:0] = ["benchmarks", "tests"]
import precompile
def broken():
    raise RuntimeError("no such layout")
sys.modules["broken"] = types.SimpleNamespace(packdit_calls=lambda: [("broken step", broken)])
jobs, failures = precompile.capture(["broken", "norm"], 90)
print(len(jobs), failures)
"""
    done = _python_without_interpreter("-c", script)
    recorded, failures = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(recorded) > 0 and failures == "['recording broken: RuntimeError: no such layout']", done.stdout
