"""Ahead-of-time compilation of every packdit Triton kernel for sm_90 (H100) and sm_80 (A100), no GPU needed.

The interpreter tests (``TRITON_INTERPRET=1``) run the kernels' Python semantics in numpy; they never
lower them, so they cannot see what only the GPU compiler checks: ``tl.dot`` shape and dtype rules, bf16 /
fp16 conversions and layouts, the software pipeline (``num_stages``), ptxas errors, and the shared memory a
configuration needs. Here each kernel is compiled through Triton's CUDA backend (MLIR passes and the bundled
ptxas, down to a cubin) with the constexprs, warps and stages its launcher uses: every autotuning
configuration, tile size the attention schedule can pick (BLOCK_M / BLOCK_KT in 16..128), head dim (64, 72
and 128, 256: column chunks 64, 64 + 16, 128, 256), dtype, GQA, and the QK-norm / RoPE kernels.

Each compiled kernel must fit the target's shared memory per block (227 KiB on H100, 163 KiB on A100). An
autotuning configuration may exceed it: ``triton.autotune`` benchmarks a configuration whose launch raises
``OutOfResources`` as infinitely slow, i.e. skips it, so instead every autotuning key must keep at least one
configuration that fits. Kernels launched with one fixed configuration have no such fallback.

Pointers are specialised as 16-byte aligned; the attention kernels' strides arrive in units of 16 bytes (their
ALIGN constexpr), row strides as multiples of 16 of those, head strides only at D = 128 and 256 (a D = 72 head
stride is 9 units). The kernels compile in worker
processes (see ``triton_aot``) into a fresh Triton cache. By default: on sm_90 every autotuning
configuration of the attention forward (bf16, each head dim and BLOCK_M) and of the GEMM (bf16 and fp32,
each epilogue), the attention backward on its largest tiles, and one configuration per kernel on sm_90 and
sm_80. The exhaustive cross product (dtype x head dim x tile x GQA x epilogue, QK-norm / RoPE, both targets)
is marked slow.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import inspect
import itertools
import multiprocessing
import os

import pytest
from triton_aot import CompileCase, CompileResult, compile_case, init_worker

from packdit.ops import _triton_utils, attention, attention_schedule, gated_residual, mlp, qk_norm_rope

# Shared memory per block (opt-in maximum) by compute capability.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ATTENTION_HEAD_DIMS = (64, 72, 128, 256)
# RoPE axes (dt, dh, dw) rotating every dimension of each head dim.
# RoPE axes (dt, dh, dw) rotating every dimension of each head dim.
ROPE_AXES = {64: (16, 24, 24), 72: (24, 24, 24), 128: (32, 48, 48), 256: (64, 96, 96)}
ROW_WIDTHS = (64, 1152, 4096)  # model widths of the row kernels: one 64-column chunk, 9 x 128, 8 x 512
DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}  # Triton's CUDA defaults, for launches that pass neither
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """A compile case and how its launcher runs it: ``autotune_key`` is None for a fixed configuration, else
    the autotuner's cache key, shared by the configurations it chooses between."""

    case: CompileCase
    autotune_key: tuple | None = None


def _case(kernel: str, arg_names: list[str], types: dict, constexprs: dict, aligned, arch: int,
          num_warps: int, num_stages: int) -> CompileCase:
    """``types``: type of each runtime argument by name (every argument not in ``constexprs``)."""
    runtime = [name for name in arg_names if name not in constexprs]
    return CompileCase(kernel, tuple((name, types[name]) for name in runtime), tuple(constexprs.items()),
                       tuple(name for name in runtime if name in aligned), num_warps, num_stages, arch)


def _aligned_args(arg_names: list[str], types: dict, strides_aligned: bool) -> set[str]:
    """Pointers, plus the strides when they are multiples of 16 elements."""
    return {name for name in arg_names if types.get(name, "").startswith("*")
            or (strides_aligned and name.startswith("stride"))}


def _jit_arg_names(module: str, kernel: str) -> list[str]:
    """Argument names from the kernel's source (the kernels are interpreter objects in this process)."""
    jit = getattr(importlib.import_module(module), kernel)
    while not inspect.isfunction(jit):
        jit = jit.fn
    return list(inspect.signature(jit).parameters)


# ---------------------------------------------------------------------------------------------- attention
ATTENTION_MODULE = "packdit.ops._attention_kernels"


def _attention_types(dtype: str, dq_dtype: str) -> dict:
    tensor = "*" + dtype
    types = {name: tensor for name in ("Q", "K", "V", "Out", "DO", "DK", "DV")}
    types.update(Lse="*fp32", Delta="*fp32", GradLse="*fp32", DQ="*" + dq_dtype, QGroups="*i32", KGroups="*i32",
                 QTiles="*i32", KTiles="*i32", scale="fp32", max_len_bucket="i32", num_rows="i32", num_groups="i32")
    return types


def _shared_constexprs(dtype: str, head_dim: int, group: int) -> dict:
    """The constexprs the forward and backward launchers share (``shared`` in attention.py), for q/k/v views of
    a fused qkv projection (every stride a multiple of 16 bytes: ALIGN = 16 bytes / element)."""
    block_d0, block_d1 = attention._head_blocks(head_dim)
    return dict(HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=block_d1, GROUP=group, ALIGN=16 // ITEMSIZE[dtype],
                DOT_PRECISION=attention._DOT_PRECISION)


def _attention_case(kernel: str, dtype: str, head_dim: int, constexprs: dict, arch: int, num_warps: int,
                    num_stages: int, dq_dtype: str | None = None) -> CompileCase:
    """Strides arrive divided by ALIGN: row strides (3 H D / ALIGN for the qkv views) as multiples of 16 when the
    head count allows, head strides (D / ALIGN) only for D = 128, 256 (D = 72 gives 9)."""
    names = _jit_arg_names(ATTENTION_MODULE, kernel)
    types = _attention_types(dtype, dq_dtype or dtype)
    types.update({name: "i32" for name in names if name.startswith("stride")})
    aligned = {name for name in names if types.get(name, "").startswith("*") or name.endswith("n")
               and name.startswith("stride")}
    if (head_dim * ITEMSIZE[dtype] // 16) % 16 == 0:
        aligned |= {name for name in names if name.startswith("stride") and name.endswith("h")}
    return _case(f"{ATTENTION_MODULE}:{kernel}", names, types, constexprs, aligned, arch, num_warps, num_stages)


def attention_fwd_configs(dtype: str, head_dim: int, block_m: int, group: int, arch: int):
    """Every autotuning configuration of the forward kernel (after the launcher's pruning) for a schedule with
    query tiles of ``block_m`` rows (one autotuning key)."""
    rows = attention._fwd_rows(block_m, head_dim, ITEMSIZE[dtype])
    key = ("attention_fwd", dtype, head_dim, rows, group, arch)
    constexprs = dict(_shared_constexprs(dtype, head_dim, group), TILE=block_m, BLOCK_M=rows)
    for config in attention._prune_fwd_configs(attention.fwd_configs(), {}, **constexprs):
        case = _attention_case("attention_fwd_kernel", dtype, head_dim, dict(constexprs, **config.kwargs), arch,
                               config.num_warps, config.num_stages)
        yield KernelConfig(case, key)


def _bwd_options(dtype: str, head_dim: int, warps: int) -> dict:
    return dict(num_warps=warps, num_stages=attention._bwd_num_stages(head_dim, ITEMSIZE[dtype]))


def attention_dkdv_config(dtype: str, head_dim: int, block_kt: int, group: int, atomic_dq: bool,
                          arch: int) -> KernelConfig:
    """The dK/dV kernel for a schedule with key tiles of ``block_kt`` rows."""
    rows = attention._dkdv_rows(block_kt, head_dim, ITEMSIZE[dtype], group)
    constexprs = dict(_shared_constexprs(dtype, head_dim, group), TILE=block_kt, BLOCK_M=attention._BWD_INNER,
                      BLOCK_N=rows, ATOMIC_DQ=atomic_dq)
    return KernelConfig(_attention_case("attention_bwd_dkdv_kernel", dtype, head_dim, constexprs, arch,
                                        dq_dtype="fp32" if atomic_dq else dtype,
                                        **_bwd_options(dtype, head_dim, attention._dkdv_num_warps(rows))))


def attention_dq_config(dtype: str, head_dim: int, block_m: int, group: int, arch: int) -> KernelConfig:
    """The deterministic dQ kernel for a schedule with query tiles of ``block_m`` rows."""
    rows = attention._bwd_rows(block_m, head_dim, ITEMSIZE[dtype])
    constexprs = dict(_shared_constexprs(dtype, head_dim, group), TILE=block_m, BLOCK_M=rows,
                      BLOCK_N=attention._BWD_INNER)
    return KernelConfig(_attention_case("attention_bwd_dq_kernel", dtype, head_dim, constexprs, arch,
                                        **_bwd_options(dtype, head_dim, attention._bwd_num_warps(rows, head_dim))))


def attention_delta_config(dtype: str, head_dim: int, has_grad_lse: bool, arch: int) -> KernelConfig:
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), BLOCK_R=64,
                      HAS_GRAD_LSE=has_grad_lse, ALIGN=16 // ITEMSIZE[dtype])
    return KernelConfig(_attention_case("attention_bwd_delta_kernel", dtype, head_dim, constexprs, arch,
                                        **DEFAULT_OPTIONS))


def qk_norm_rope_configs(dtype: str, head_dim: int, norm: bool, rope: bool, arch: int):
    """The QK-norm / RoPE kernels (forward, backward) at the launcher's block shape."""
    block_d, block_t = qk_norm_rope._launch_shape(head_dim)
    axes = ROPE_AXES[head_dim] if rope else (0, 0, 0)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, NORM=norm, ROPE=rope, AX_T=axes[0],
                      AX_H=axes[1], AX_W=axes[2])
    module = "packdit.ops.qk_norm_rope"
    for kernel in ("_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"):
        names = _jit_arg_names(module, kernel)
        types = {name: "i32" for name in names}
        types.update({name: "*" + dtype for name in ("X", "W", "Y", "DY", "DX")}, Pos="*i32", DWPartial="*fp32",
                     eps="fp32", log2_theta="fp32")
        aligned = {name for name in names if types[name].startswith("*")}
        yield KernelConfig(_case(f"{module}:{kernel}", names, types, constexprs, aligned, arch, **DEFAULT_OPTIONS))


# ---------------------------------------------------------------------------------------------- other ops
def _pointer_case(module: str, kernel: str, dtype: str, constexprs: dict, arch: int, pointer_types: dict,
                  float_args=(), **options) -> KernelConfig:
    """A kernel whose ``*_ptr`` arguments are ``dtype`` unless named in ``pointer_types`` and whose other
    runtime arguments are i32 sizes/strides (multiples of 16) or the fp32 scalars ``float_args``."""
    names = _jit_arg_names(module, kernel)
    types = {name: pointer_types.get(name, "*" + dtype) if name.endswith("_ptr")
             else "fp32" if name in float_args else "i32" for name in names}
    aligned = {name for name in names if types[name] != "fp32"} - {"N", "M", "R", "num_tiles", "numel", "m_bucket"}
    return KernelConfig(_case(f"{module}:{kernel}", names, types, constexprs, aligned, arch,
                              **dict(DEFAULT_OPTIONS, **options)))


def modulated_norm_configs(dtype: str, width: int, rms: bool, affine: bool, arch: int):
    absent = {} if affine else dict(weight_ptr=None, bias_ptr=None)
    stats = dict(mean_ptr="*fp32", rstd_ptr="*fp32", index_ptr="*i32", order_ptr="*i32", tiles_ptr="*i32",
                 chunk_tiles_ptr="*i32")
    partials = {name: "*fp32" for name in ("partial_shift_ptr", "partial_scale_ptr", "partial_weight_ptr",
                                            "partial_bias_ptr")}
    for kernel, backward in (("_modulated_norm_fwd", False), ("_modulated_norm_bwd", True)):
        blocks = _triton_utils.row_blocks(width, backward, affine)
        flags = dict(D=width, IS_RMS=rms, HAS_WEIGHT=affine, HAS_BIAS=affine, BLOCK_M=blocks.block_m,
                     CHUNK=blocks.chunk_d, NUM_CHUNKS=blocks.num_chunks)
        # Only the backward writes weight/bias partials.
        absent_partials = dict(partial_weight_ptr=None, partial_bias_ptr=None) if backward and not affine else {}
        yield _pointer_case("packdit.ops.modulate", kernel, dtype, dict(flags, **absent, **absent_partials), arch,
                            dict(stats, **partials), float_args=("eps",), num_warps=blocks.num_warps)


def gated_residual_configs(dtype: str, arch: int):
    blocks = dict(BLOCK_M=gated_residual._BLOCK_M, BLOCK_D=gated_residual._BLOCK_D)
    rows = dict(index_ptr="*i32", order_ptr="*i32", tiles_ptr="*i32", chunk_tiles_ptr="*i32", partial_ptr="*fp32")
    yield _pointer_case("packdit.ops.gated_residual", "_gated_residual_fwd", dtype, blocks, arch, rows)
    yield _pointer_case("packdit.ops.gated_residual", "_gated_residual_bwd", dtype,
                        dict(blocks, STAGES=gated_residual._STAGES), arch, rows)


def segment_sum_configs(arch: int):
    for block_d in (64, 1024):  # min(1024, next_pow2(D)) for D = 64 and D >= 1024
        yield _pointer_case("packdit.ops._triton_utils", "_segment_sum_kernel", "fp32", dict(BLOCK_D=block_d), arch,
                            dict(tile_offsets_ptr="*i64"))


def gelu_tanh_bwd_config(dtype: str, arch: int) -> KernelConfig:
    return _pointer_case("packdit.ops.mlp", "_gelu_tanh_bwd", dtype, dict(BLOCK=mlp._ELEMENTWISE_BLOCK), arch, {})


def linear_configs(dtype: str, epilogue: int, has_bias: bool, arch: int):
    """Autotuning configurations of the GEMM for one epilogue (launch arguments of ``mlp._linear``)."""
    key = ("linear", dtype, epilogue, has_bias, arch)
    gated = epilogue == mlp._EPILOGUE_GATED
    absent = {} if gated else dict(src_ptr=None, gate_ptr=None, index_ptr=None)
    if epilogue == mlp._EPILOGUE_BIAS:
        absent["aux_ptr"] = None
    if not has_bias:
        absent["bias_ptr"] = None
    flags = dict(EPILOGUE=epilogue, HAS_BIAS=has_bias, IEEE=dtype == "fp32")
    for config in mlp._GEMM_TILE_CONFIGS:
        yield dataclasses.replace(
            _pointer_case("packdit.ops.mlp", "_linear_kernel", dtype, dict(flags, **absent, **config.kwargs), arch,
                          dict(index_ptr="*i32"), num_warps=config.num_warps, num_stages=config.num_stages),
            autotune_key=key)


# ---------------------------------------------------------------------------------------------- the sweep
def _config_id(config: KernelConfig) -> str:
    case = config.case
    values = dict(case.constexprs)
    dtype = next((kind[1:] for name, kind in case.signature if name in ("Q", "Out", "a_ptr", "x_ptr", "dout_ptr",
                                                                          "pre_ptr", "partials_ptr")), "")
    parts = [case.kernel.split(":")[1].strip("_").removesuffix("_kernel"), dtype]
    for name, label in (("HEAD_DIM", "d"), ("TILE", "t"), ("BLOCK_M", "m"), ("BLOCK_N", "n"), ("BLOCK_K", "k"),
                        ("BLOCK_D", "bd"), ("BLOCK", "b"), ("GROUP", "g"), ("EPILOGUE", "epi")):
        if name in values and not (name == "BLOCK_D" and "HEAD_DIM" in values):
            parts.append(f"{label}{values[name]}")
    for flag in ("NORM", "ROPE", "ATOMIC_DQ", "HAS_GRAD_LSE", "IS_RMS", "HAS_WEIGHT", "HAS_BIAS"):
        if values.get(flag):
            parts.append(flag.lower().removeprefix("has_").removeprefix("is_"))
    parts += [f"w{case.num_warps}s{case.num_stages}", f"sm{case.arch}"]
    return "-".join(parts)


def attention_fwd_sweep(arch: int):
    """Every autotuning configuration of the forward for every head dim and BLOCK_M (bf16)."""
    for head_dim, block_m in itertools.product(ATTENTION_HEAD_DIMS, attention_schedule.TILE_SIZES):
        yield from attention_fwd_configs("bf16", head_dim, block_m, 1, arch)


def linear_sweep(arch: int, dtypes=("bf16", "fp32"), epilogues=((0, True), (1, True), (2, True))):
    """Every GEMM autotuning configuration for each ``(epilogue, has_bias)``."""
    for dtype, (epilogue, has_bias) in itertools.product(dtypes, epilogues):
        yield from linear_configs(dtype, epilogue, has_bias, arch)


def attention_backward_largest_tiles(arch: int, dtype: str, head_dims):
    """The backward kernels on the schedule's largest tiles (128 rows), the most shared memory per head dim."""
    for head_dim in head_dims:
        yield attention_dkdv_config(dtype, head_dim, 128, 2, True, arch)
        yield attention_dq_config(dtype, head_dim, 128, 2, arch)


def representative(arch: int, dtype: str):
    """One configuration per kernel: the attention kernels on 128-row tiles at D = 128 with GQA (the forward in
    its first autotuning configuration), QK-norm + RoPE at D = 72, the GEMM's gated epilogue in its first, the
    launchers' choices for a DiT-XL width (1152) elsewhere."""
    yield next(attention_fwd_configs(dtype, 128, 128, 2, arch))
    yield attention_dkdv_config(dtype, 128, 128, 2, True, arch)
    yield attention_dq_config(dtype, 128, 128, 2, arch)
    yield attention_delta_config(dtype, 128, True, arch)
    yield from qk_norm_rope_configs(dtype, 72, True, True, arch)
    yield from modulated_norm_configs(dtype, 1152, False, True, arch)
    yield from gated_residual_configs(dtype, arch)
    yield gelu_tanh_bwd_config(dtype, arch)
    yield next(linear_configs(dtype, mlp._EPILOGUE_GATED, True, arch))
    yield next(segment_sum_configs(arch))


def exhaustive(arch: int):
    """The cross product of the launchers' choices."""
    dtypes = ("bf16", "fp16", "fp32")
    for dtype, head_dim, block in itertools.product(dtypes, ATTENTION_HEAD_DIMS, attention_schedule.TILE_SIZES):
        for group in (1, 2):
            yield from attention_fwd_configs(dtype, head_dim, block, group, arch)
            for atomic_dq in (True, False):
                yield attention_dkdv_config(dtype, head_dim, block, group, atomic_dq, arch)
            yield attention_dq_config(dtype, head_dim, block, group, arch)
    for dtype, head_dim, norm, rope in itertools.product(dtypes, ATTENTION_HEAD_DIMS, (False, True), (False, True)):
        if norm or rope:
            yield from qk_norm_rope_configs(dtype, head_dim, norm, rope, arch)
    for dtype, head_dim, has_grad_lse in itertools.product(dtypes, ATTENTION_HEAD_DIMS, (False, True)):
        yield attention_delta_config(dtype, head_dim, has_grad_lse, arch)
    for dtype in dtypes:
        for width, rms, affine in itertools.product(ROW_WIDTHS, (False, True), (False, True)):
            yield from modulated_norm_configs(dtype, width, rms, affine, arch)
        yield from gated_residual_configs(dtype, arch)
        yield gelu_tanh_bwd_config(dtype, arch)
    yield from segment_sum_configs(arch)
    yield from linear_sweep(arch, dtypes, ((0, False), (0, True), (1, True), (2, True)))


def _unique(configs) -> list[KernelConfig]:
    return list(dict.fromkeys(configs))


# Default: the sm_90 sweeps of the autotuned kernels, the backward where shared memory is tightest, one
# configuration per kernel on each target. Slow: everything else of the cross product, on both targets.
FAST = _unique([*attention_fwd_sweep(90), *linear_sweep(90),
                *attention_backward_largest_tiles(90, "bf16", (128, 256)), *representative(90, "bf16"),
                *representative(80, "bf16")])
_FAST_SET = set(FAST)
EXHAUSTIVE = [config for config in _unique([*exhaustive(90), *exhaustive(80)]) if config not in _FAST_SET]


def _params(configs):
    return [pytest.param(config, id=_config_id(config)) for config in configs]


def _autotune_groups(fast: bool):
    """Every autotuning key's configurations (all of them, from both sets), where all of them are in FAST
    (``fast``) or not."""
    groups: dict[tuple, list[KernelConfig]] = {}
    for config in [*FAST, *EXHAUSTIVE]:
        if config.autotune_key is not None:
            groups.setdefault(config.autotune_key, []).append(config)
    return [pytest.param(tuple(group), id="-".join(map(str, key))) for key, group in groups.items()
            if all(config in _FAST_SET for config in group) == fast]


# ---------------------------------------------------------------------------------------------- tests
def _selected_configs(session, module_path) -> list[KernelConfig]:
    """The kernel configurations the selected, not skipped tests of this module need, in test order."""
    configs = []
    for item in session.items:
        if item.path != module_path or item.get_closest_marker("skip") or not hasattr(item, "callspec"):
            continue
        for value in item.callspec.params.values():
            configs.extend(value if isinstance(value, tuple) else [value])
    return _unique(configs)


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """``compiled(config) -> CompileResult``; all selected configurations are submitted at once to one
    worker process per CPU (compilation is CPU-bound and single-threaded)."""
    context = multiprocessing.get_context("spawn")
    cache_dir = str(tmp_path_factory.mktemp("triton_cache"))
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context, initializer=init_worker,
                                                initargs=(cache_dir,)) as pool:
        futures = {config: pool.submit(compile_case, config.case)
                   for config in _selected_configs(request.session, request.path)}

        def result(config: KernelConfig) -> CompileResult:
            if config not in futures:
                futures[config] = pool.submit(compile_case, config.case)
            return futures[config].result()

        yield result
        for future in futures.values():
            future.cancel()


def _check_fits(config: KernelConfig, result: CompileResult) -> None:
    limit = SHARED_MEMORY_LIMIT[config.case.arch]
    assert result.shared <= limit, (f"{_config_id(config)} needs {result.shared} B of shared memory, more than "
                                    f"the {limit} B of sm_{config.case.arch}")


def _check_compiles(config: KernelConfig, compiled) -> None:
    result = compiled(config)
    assert result.registers > 0
    if config.autotune_key is None:
        _check_fits(config, result)


@pytest.mark.parametrize("config", _params(FAST))
def test_compiles(config, compiled):
    """Compiles; a fixed configuration also fits the target's shared memory."""
    _check_compiles(config, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("config", _params(EXHAUSTIVE))
def test_compiles_exhaustive(config, compiled):
    _check_compiles(config, compiled)


def _check_autotune_group(group: tuple[KernelConfig, ...], compiled) -> None:
    shared = [compiled(config).shared for config in group]
    limit = SHARED_MEMORY_LIMIT[group[0].case.arch]
    assert min(shared) <= limit, (f"no autotuning configuration fits the {limit} B of shared memory: "
                                  f"{dict(zip(map(_config_id, group), shared))}")


@pytest.mark.parametrize("group", _autotune_groups(fast=True))
def test_autotune_key_has_config_that_fits(group, compiled):
    """``triton.autotune`` skips configurations that run out of shared memory, but needs one that does not."""
    _check_autotune_group(group, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("group", _autotune_groups(fast=False))
def test_autotune_key_has_config_that_fits_exhaustive(group, compiled):
    _check_autotune_group(group, compiled)
