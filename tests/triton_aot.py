"""Ahead-of-time compilation of a packdit Triton kernel for a CUDA target, in a worker process.

The test session imports packdit's kernels under ``TRITON_INTERPRET=1`` (as interpreter functions, which
cannot be compiled), so the compilation runs in worker processes started with :func:`init_worker`, which
turns the interpreter off before packdit is imported there. This module imports neither triton nor
packdit at import time for that reason.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import tempfile
import traceback


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation, as a launch would compile it.

    Attributes:
        kernel: ``"module:attribute"`` of the kernel (a ``triton.jit`` function, possibly autotuned).
        signature: ``(name, type)`` of the runtime arguments: ``"*bf16"``, ``"i32"``, ``"fp32"``...
        constexprs: ``(name, value)`` of the compile-time arguments, including pointers passed as None.
        aligned: runtime arguments specialised as multiples of 16 (16-byte aligned pointers, strides and
            sizes divisible by 16), as Triton's launcher does for such values.
        num_warps, num_stages: compile options.
        arch: CUDA compute capability as an int (90 = sm_90).
    """

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    aligned: tuple[str, ...]
    num_warps: int
    num_stages: int
    arch: int


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """Resources of the compiled kernel: shared memory per block (bytes) from Triton's metadata; registers
    and stack frame per thread (bytes; nonzero means register spills) from ``cuobjdump`` on the cubin."""

    shared: int
    registers: int
    stack: int


def init_worker(cache_dir: str) -> None:
    """Process initializer: compile for real targets (no interpreter) into ``cache_dir``."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_case(case: CompileCase) -> CompileResult:
    """Compile ``case``; a failure is raised as ``RuntimeError`` carrying the compiler's traceback (Triton's
    exceptions do not all survive pickling back to the parent process)."""
    try:
        return _compile(case)
    except Exception:
        raise RuntimeError(traceback.format_exc()) from None


def _compile(case: CompileCase) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, attribute = case.kernel.split(":")
    kernel = getattr(importlib.import_module(module_name), attribute)
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap autotune / heuristics
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{case.kernel}: expected a triton.jit function, got {type(kernel).__name__} "
                            "(is TRITON_INTERPRET set in this process?)")
        kernel = kernel.fn
    constexprs = dict(case.constexprs)
    signature = dict(case.signature)
    signature.update({name: "constexpr" for name in constexprs})
    missing = set(kernel.arg_names) ^ set(signature)
    if missing:
        raise ValueError(f"{case.kernel}: arguments {sorted(missing)} do not match the kernel's {kernel.arg_names}")
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in case.aligned}
    compiled = triton.compile(
        ASTSource(kernel, {name: signature[name] for name in kernel.arg_names}, constexprs, attrs),
        target=GPUTarget("cuda", case.arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    registers, stack = _cubin_resources(compiled.asm["cubin"])
    return CompileResult(compiled.metadata.shared, registers, stack)


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack frame bytes)`` per thread of the single kernel in ``cubin``."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", file.name], check=True, capture_output=True,
                               text=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if registers is None or stack is None:
        raise ValueError(f"unexpected cuobjdump output: {usage!r}")
    return int(registers.group(1)), int(stack.group(1))
