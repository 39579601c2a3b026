"""Section ``sass``: static measures of every hot packdit Triton kernel, compiled for sm_90 (and sm_80), no GPU.

The compiled code is the measurement until a GPU runs the timed sections. The real launchers run under a
recorder (``tests/kernel_launches.py``: one- and two-block DiT-B/2, DiT-XL/2, STDiT-XL/2, a 2B-class and
DiT-3B with RoPE on and off, all attention modes, GQA, every attention tile size, the MLP's bias epilogue),
so each kernel compiles with exactly the specialisation its launcher produces at run time (constexprs, every
autotuning configuration, integers equal to 1 or divisible by 16, pointer alignment). Each distinct
specialisation is compiled through Triton's CUDA backend and read back from the cubin (``tests/triton_aot.py``)
and its SASS (``tests/sass_parser.py``, which defines the hot loop and issue/MMA).

Columns per kernel x config: registers, ``spill_bytes`` (stack frame per thread; nonzero = local memory) and
ptxas's spill stores, shared memory, ``programs_per_sm`` (how many of its thread blocks fit one SM by registers,
shared memory and warps: the occupancy calculator's rules), ``tile`` / ``block_m`` (attention: a schedule tile's
query rows / a program's), MMA instructions in the hot loop (``wgmma`` HGMMA, ``mma_sync`` HMMA),
``cp_async`` (16-byte LDGSTS: cp.async tile copies) / ``tma`` (UTMALDG, UBLKCP) anywhere in the kernel and
``loop_pipelined`` (either in the hot loop), MUFU in the loop, ``loop_instructions_per_warp``,
``issue_per_mma`` (<= 1: the tensor cores bound the loop), ``c7515`` (ptxas: wgmma serialised), global load /
store widths (``ldg_bits``: "128x12 32x2" = twelve 128-bit and two 32-bit loads per thread in the kernel),
compile wall and CPU seconds. All are estimates from static code.

Writes ``<out>/static-sm90/sass.{json,csv,png}`` and ``<out>/static-sm80/sass.{json,csv}``. ``--quick`` compiles
one configuration of each kernel of one model on sm_90 only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from common import Context, print_table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kernel_launches  # noqa: E402
import sass_parser  # noqa: E402
import triton_aot  # noqa: E402

RESULTS_SLUG = "static-sm90"
ARCHS = (90, 80)
PROCESSES = 2
GEMM_KERNELS = ("_linear_kernel", "_linear_tma_kernel")
COLUMNS = ["kernel", "config", "head_dim", "rope", "width", "registers", "spill_bytes", "shared_bytes",
           "programs_per_sm", "wgmma", "mma_sync", "cp_async", "tma", "loop_pipelined", "mufu",
           "loop_instructions_per_warp", "issue_per_mma", "c7515"]


def _scenarios_rope(launches: list[triton_aot.Launch]):
    """Whether the scenarios launching a kernel without a RoPE constexpr have RoPE on: True, False, or "on+off"
    for a kernel that RoPE-on and RoPE-off scenarios share (the attention kernels: RoPE runs in the QK-norm pass)."""
    ropes = {dict(launch.tags).get("rope") for launch in launches} - {None}
    return "on+off" if len(ropes) > 1 else next(iter(ropes), None)


# Per SM (CUDA occupancy calculator, compute capability 9.0 / 8.0): registers, allocated per warp in units of
# 256; shared memory (228 / 164 KiB, of which 1 KiB reserved per block); resident warps and blocks.
_SM_LIMITS = {90: dict(registers=65536, shared=233472, warps=64, blocks=32),
              80: dict(registers=65536, shared=167936, warps=64, blocks=32)}


def programs_per_sm(arch: int, registers: int, warps: int, shared: int) -> int:
    """How many programs (thread blocks) of a kernel fit one SM at once, by its registers per thread, warps and
    shared memory per block: a static occupancy limit (one means nothing overlaps a program's prologue and
    epilogue on that SM)."""
    limits = _SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * warps) if registers else limits["blocks"]
    by_shared = limits["shared"] // (shared + 1024)
    return min(by_registers, by_shared, limits["warps"] // warps, limits["blocks"])


def _widths(counts: dict) -> str:
    return " ".join(f"{bits}x{count}" for bits, count in counts.items())


def row(case: triton_aot.CompileCase, launches: list[triton_aot.Launch], result: triton_aot.CompileResult) -> dict:
    """One table row: what the case is (from its constexprs and the scenarios that launch it) and its measures."""
    stats = sass_parser.kernel_stats(result.sass, result.ptxas_log, case.num_warps)
    loop = stats.loop
    values = dict(case.constexprs)
    tags = dict(launches[0].tags)
    int_args = dict(launches[0].int_args)
    autotune = launches[0].autotune
    return {
        "kernel": case.name.strip("_"),
        "config": triton_aot.case_label(case),
        "arch": f"sm_{case.arch}",
        "head_dim": values.get("HEAD_DIM"),
        "rope": values.get("ROPE", _scenarios_rope(launches)),
        "width": tags.get("width"),
        "gemm_nk": f"{int_args['N']}x{int_args['K']}" if case.name in GEMM_KERNELS else None,
        "tile": values.get("TILE"),
        "block_m": values.get("BLOCK_M"),
        "block_n": values.get("BLOCK_N"),
        "epilogue": values.get("EPILOGUE"),
        "warps": case.num_warps,
        "stages": case.num_stages,
        "autotune_configs": autotune[2] if autotune else None,
        "scenarios": "; ".join(dict.fromkeys(dict(launch.tags)["scenario"] for launch in launches)),
        "registers": result.registers,
        "spill_bytes": result.stack,
        "spill_stores": stats.spill_stores,
        "shared_bytes": result.shared,
        "programs_per_sm": programs_per_sm(case.arch, result.registers, case.num_warps, result.shared),
        "wgmma": loop.wgmma if loop else 0,
        "mma_sync": loop.mma_sync if loop else 0,
        "wgmma_kernel": stats.wgmma,
        "mma_sync_kernel": stats.mma_sync,
        "cp_async": bool(stats.cp_async_widths.get(128)),
        "tma": stats.tma > 0,
        "loop_pipelined": bool(loop and loop.pipelined),
        "mufu": loop.mufu if loop else None,
        "loop_instructions_per_warp": loop.instructions if loop else None,
        "loop_mma_flops": loop.mma_flops_per_cta(case.num_warps) if loop else None,
        "issue_per_mma": round(loop.issue_per_mma(case.num_warps), 3) if loop and loop.has_mma else None,
        "hot_loop_candidates": stats.hot_loop_candidates,
        "kernel_instructions": stats.instructions,
        "ldg_bits": _widths(stats.ldg_widths),
        "stg_bits": _widths(stats.stg_widths),
        "cp_async_bits": _widths(stats.cp_async_widths),
        "c7515": "C7515" in stats.warnings,
        "ptxas_codes": " ".join(stats.warnings),
        "compile_seconds": round(result.seconds, 2),
        "compile_cpu_seconds": round(result.cpu_seconds, 2),
    }


def _runs_on(arch: int, case: triton_aot.CompileCase, launches: list[triton_aot.Launch]) -> bool:
    """Whether ``arch`` runs this kernel: the GEMM takes TMA descriptors from sm_90 on and pointer loads before
    (the scenarios capture the TMA kernel, and the pointer kernel where a scenario says ``tma=False``)."""
    if arch < 90:
        return case.name != "_linear_tma_kernel"
    return any(dict(launch.tags).get("tma", True) for launch in launches)


def measure(workers: triton_aot.Workers, scenarios, arch: int, quick: bool = False) -> list[dict]:
    """Rows of every distinct compile case the ``scenarios`` launch, compiled for ``arch``."""
    from tqdm import tqdm

    cases = {case: launches for case, launches in triton_aot.unique_cases(workers.captured(scenarios), arch).items()
             if _runs_on(arch, case, launches)}
    if quick:
        cases = triton_aot.first_per_kernel(cases)
    futures = {case: workers.compile(case) for case in cases}
    return [row(case, cases[case], future.result())
            for case, future in tqdm(futures.items(), desc=f"compiling for sm_{arch}", unit="kernel")]


def run(ctx: Context) -> list[dict]:
    started = time.perf_counter()
    if ctx.quick:
        scenarios, archs = [s for s in kernel_launches.PRODUCTION if s.name == "DiT-XL/2 long"], ARCHS[:1]
    else:
        scenarios, archs = kernel_launches.PRODUCTION, ARCHS
    # TRITON_CACHE_DIR keeps compiled kernels (and their ptxas logs) across runs; default: a fresh cache
    with tempfile.TemporaryDirectory() as fresh:
        cache = os.environ.get("TRITON_CACHE_DIR", fresh)
        with triton_aot.Workers(PROCESSES, cache, archs) as workers:
            rows = measure(workers, scenarios, 90, ctx.quick)
            seconds = time.perf_counter() - started
            for arch in archs[1:]:  # other targets: their own folder beside the section's
                write_results(ctx, "sass", measure(workers, scenarios, arch, ctx.quick), slug=f"static-sm{arch}")
    print_table(f"SASS, sm_90 ({len(rows)} kernel configurations, captured and compiled in {seconds:.0f} s "
                f"on {PROCESSES} processes; static estimates)", rows, COLUMNS)
    return rows


def plot(rows: list[dict], path) -> None:
    """Left: attention on 128-row tiles, the best issue/MMA over the autotuning configurations of each kernel x
    head dim x RoPE (annotated with the largest spill among them). Right: every GEMM configuration (annotated
    with spills and C7515)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        rows_per_program = r["block_n"] if "dkdv" in r["kernel"] else r["block_m"]
        if r["kernel"].startswith("attention") and r["issue_per_mma"] is not None and rows_per_program == 128 \
                and "-g1-" in r["config"]:
            groups.setdefault((r["kernel"].removeprefix("attention_").removesuffix("_kernel"), r["head_dim"],
                               r["rope"]), []).append(r)
    labels, values, spills = [], [], []
    for (kernel, head_dim, rope), found in sorted(groups.items()):
        labels.append(f"{kernel} d{head_dim}{ {True: ' rope', False: '', None: ''}.get(rope, f' rope {rope}')}")
        values.append(min(r["issue_per_mma"] for r in found))
        spills.append(max(r["spill_bytes"] for r in found))
    _bars(left, labels, values, [f"spill <= {s} B" if s else "" for s in spills],
          "attention, 128-row tiles: best issue/MMA over autotuning configurations")
    gemm = sorted((r for r in rows if "_" + r["kernel"] in GEMM_KERNELS), key=lambda r: (r["epilogue"], r["config"]))
    _bars(right, [r["config"].removesuffix("-sm90") for r in gemm],
          [r["issue_per_mma"] for r in gemm],
          [" ".join(filter(None, (f"spill {r['spill_bytes']} B" if r["spill_bytes"] else "",
                                  "C7515" if r["c7515"] else ""))) for r in gemm],
          "GEMM (MLP), every autotuning configuration: issue/MMA")
    fig.suptitle("packdit Triton kernels, sm_90 bf16, static SASS estimates "
                 "(issue/MMA <= 1: tensor-core bound; red > 1, orange > 0.8)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _bars(ax, labels, values, notes, title) -> None:
    colors = ["tab:red" if v > 1 else "tab:orange" if v > 0.8 else "tab:green" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    for y, (value, note) in enumerate(zip(values, notes)):
        ax.text(value, y, f" {value:.2f} {note}", va="center", fontsize=6)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("issue / MMA of the hot loop")
