"""Ahead-of-time compilation of every packdit Triton kernel for sm_90 (H100) and sm_80 (A100), no GPU needed.

The interpreter tests (``TRITON_INTERPRET=1``) run the kernels' Python semantics in numpy; they never
lower them, so they cannot see what only the GPU compiler checks: ``tl.dot`` shape and dtype rules, bf16 /
fp16 conversions and layouts, the software pipeline (``num_stages``), ptxas errors, and the shared memory a
configuration needs. Here each kernel is compiled through Triton's CUDA backend (MLIR passes and the bundled
ptxas, down to a cubin) with exactly the specialisation its launcher produces at run time: the launches are
captured from the real launchers (``kernel_launches``: DiT models, attention in every mode, tile size, head
dim 64 / 72 / 128 / 256, RoPE on and off, GQA, the QK-norm / RoPE kernels with either or both, the MLP's
epilogues with and without bias, LayerNorm / RMSNorm with and without affine parameters into the gated
residual, bf16 / fp16 / fp32), so constexprs,
warps, stages, every autotuning configuration and the integers Triton specialises (equal to 1, e.g. a unit
stride, or divisible by 16, e.g. not head dim 72's head stride) are those of the run.

Each compiled kernel must fit the target's shared memory per block (227 KiB on H100, 163 KiB on A100). An
autotuning configuration may exceed it: ``triton.autotune`` benchmarks a configuration whose launch raises
``OutOfResources`` as infinitely slow, i.e. skips it, so instead every autotuning key must keep at least one
configuration that fits. Kernels launched with one fixed configuration have no such fallback.

The kernels compile in worker processes (``triton_aot``) into a Triton cache shared with the SASS budget
tests. By default: on sm_90 the production scenarios the budgets read (bf16, every autotuning configuration)
plus head dim 256, the fp32 GEMM (GELU and gated epilogues) and one configuration of each attention kernel under a
loss of the LSE (the delta kernel's dlse variant); on sm_80 one configuration of each kernel of
DiT-XL/2 and DiT-3B and of the gated pointer GEMM, and every configuration of the pointer GEMM (sm_80 has no
TMA: it runs the GEMM without descriptors). Every other captured scenario and target, in every configuration,
is marked slow.
"""

from __future__ import annotations

import pytest
from kernel_launches import BUDGETED, COVERAGE, PRODUCTION, Scenario
from triton_aot import CompileCase, CompileResult, Launch, case_label, first_per_kernel, shared_workers, unique_cases

# Shared memory per block (opt-in maximum) by compute capability.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)


def _named(*names: str) -> list[Scenario]:
    found = [s for s in (*PRODUCTION, *COVERAGE) if s.name in names]
    assert len(found) == len(names), f"unknown scenarios {set(names) - {s.name for s in found}}"
    return found


# (scenario, arch, every configuration) by default: sm_90 in full; on sm_80 one configuration per kernel
FAST = [*((s, 90, True) for s in BUDGETED),
        *((s, 90, True) for s in _named("attention 2048/8 full long bf16", "mlp 1152 gated fp32")),
        *((s, 90, False) for s in _named("attention 1152/16 lse full long bf16")),
        *((s, 80, False) for s in _named("DiT-XL/2 long", "DiT-3B long", "mlp 1152 gated pointer bf16")),
        *((s, 80, True) for s in _named("mlp 1152 pointer bf16"))]
_FAST_FULL = {(s, arch) for s, arch, every in FAST if every}
EXHAUSTIVE = [(s, arch, True) for arch in ARCHS for s in (*PRODUCTION, *COVERAGE) if (s, arch) not in _FAST_FULL]


def _params(triples):
    return [pytest.param(scenario, arch, every, id=f"{scenario.name}-sm{arch}{'' if every else '-first'}")
            for scenario, arch, every in triples]


def _compiled(scenario: Scenario, arch: int, every: bool) -> tuple[list[Launch], dict[CompileCase, CompileResult]]:
    """The scenario's launches and the compile result of each distinct case on ``arch`` (all, or the first
    configuration of each kernel)."""
    workers = shared_workers()
    launches = workers.captured([scenario])
    cases = unique_cases(launches, arch)
    futures = {case: workers.compile(case) for case in (cases if every else first_per_kernel(cases))}
    return launches, {case: future.result() for case, future in futures.items()}


def _check(scenario: Scenario, arch: int, every: bool) -> None:
    """Every case compiles; a fixed configuration fits the target's shared memory; with every configuration
    compiled, every autotuning key keeps one that fits (``triton.autotune`` skips the others)."""
    launches, results = _compiled(scenario, arch, every)
    limit = SHARED_MEMORY_LIMIT[arch]
    problems = [f"{case_label(case)} has no registers" for case, result in results.items() if result.registers <= 0]
    groups: dict[tuple, dict[CompileCase, int]] = {}
    for launch in launches:
        case = launch.case(arch)
        if case not in results:
            continue
        if launch.autotune is None:
            if results[case].shared > limit:
                problems.append(f"{case_label(case)} needs {results[case].shared} B of shared memory, more than the "
                                f"{limit} B of sm_{arch}")
        elif every:
            groups.setdefault(launch.autotune[0], {})[case] = results[case].shared
    for key, shared in groups.items():
        if min(shared.values()) > limit:
            problems.append(f"autotuning key {key}: no configuration fits the {limit} B of shared memory: "
                            f"{ {case_label(case): size for case, size in shared.items()} }")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scenario, arch, every", _params(FAST))
def test_compiles_and_fits(scenario, arch, every):
    _check(scenario, arch, every)


@pytest.mark.slow
@pytest.mark.parametrize("scenario, arch, every", _params(EXHAUSTIVE))
def test_compiles_and_fits_exhaustive(scenario, arch, every):
    _check(scenario, arch, every)


# ---------------------------------------------------------------------------------------------- the capture
def test_capture_compiles_what_runs():
    """The launch's own specialisation, DiT-XL/2 (head dim 72) with RoPE: the GEMM is the TMA kernel on bf16
    tensor descriptors, its row count (511 tokens) not 16-divisible; the attention strides arrive in 16-byte
    units (ALIGN = 8 bf16 elements), where the row strides are 16-divisible -- v a view of the fused qkv
    (3 x 1152 / 8 = 432), q and k the rotated q|k rows (2 x 1152 / 8 = 288) -- and head dim 72's head stride (9)
    is not, and the head dim runs as 64 + 16 column chunks; RoPE is the QK-norm / RoPE kernel's alone (NORM off:
    DiT-XL/2 has no QK-norm), whose strides arrive in the same 16-byte units (qkv rows 3 x 1152 / 8 = 432,
    heads 72 / 8 = 9)."""
    launches = shared_workers().captured(_named("DiT-XL/2 rope long"))
    first = {}
    for launch in launches:
        first.setdefault(launch.case(90).name, launch)
    gemm = first["_linear_tma_kernel"].case(90)
    assert all(dict(gemm.signature)[name].startswith("tensordesc<bf16[") for name in ("a_desc", "w_desc", "out_desc"))
    assert "M" not in gemm.aligned and "K" in gemm.aligned  # 511 tokens; K = 1152
    for kernel in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel"):
        attention, strides = first[kernel].case(90), dict(first[kernel].int_args)
        constexprs = dict(attention.constexprs)
        assert (constexprs["ALIGN"], constexprs["BLOCK_D0"], constexprs["BLOCK_D1"]) == (8, 64, 16)
        assert "ROPE" not in constexprs
        assert (strides["stride_qn"], strides["stride_vn"], strides["stride_qh"]) == (288, 432, 9)
        assert {"stride_qn", "stride_vn"} <= set(attention.aligned) and "stride_qh" not in attention.aligned
        assert {"Q", "K", "V"} <= set(attention.aligned)
    for kernel in ("_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"):
        constexprs = dict(first[kernel].case(90).constexprs)
        assert constexprs["ROPE"] is True and constexprs["NORM"] is False and constexprs["ALIGN"] == 8
    rope, strides = first["_qk_norm_rope_fwd_kernel"].case(90), dict(first["_qk_norm_rope_fwd_kernel"].int_args)
    assert (strides["stride_xn"], strides["stride_xh"]) == (3 * 1152 // 8, 9)
    assert "stride_xn" in rope.aligned and "stride_xh" not in rope.aligned


def test_capture_has_both_delta_variants():
    """The model's loss never reaches the LSE: its backward gets no dlse (``HAS_GRAD_LSE`` False); the ``lse``
    scenario's loss does (True), so the default compile covers both variants of the delta kernel."""
    def variants(name):
        return {dict(launch.case(90).constexprs)["HAS_GRAD_LSE"] for launch in shared_workers().captured(_named(name))
                if launch.case(90).name == "attention_bwd_delta_kernel"}

    assert variants("DiT-XL/2 long") == {False}
    assert variants("attention 1152/16 lse full long bf16") == {True}


@pytest.mark.parametrize("name", ["DiT-XL/2 long", "STDiT-XL/2 video"])
def test_captured_token_counts_are_generic(name):
    """Integer arguments that scale with the pack (tokens, rows, tiles) get, in the captured layouts, the
    specialisation most token counts give: the majority over 0, 1 and 2 extra one-token samples."""
    import kernel_launches

    dependent = shared_workers().pool.submit(kernel_launches.token_count_dependence, *_named(name)).result()
    for (kernel, argument), kinds in dependent.items():
        assert kinds.count(kinds[0]) >= 2, f"{name}: {kernel}.{argument} specialises as {kinds[0]!r} with the " \
                                           f"captured token count but {kinds[1:]} with one or two more tokens"
