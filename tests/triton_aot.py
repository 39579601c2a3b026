"""Ahead-of-time compilation of packdit's Triton kernels for CUDA targets, exactly as their launchers run them.

Two halves, both without a GPU:

* **Capture** (:func:`capturing`): the real launchers run on CPU tensors with the Triton launch replaced by
  a recorder. For every launch, Triton's own argument binder computes the specialisation the GPU launch
  would compile: constexprs, integers equal to 1 turned into the constant 1, pointers / integers divisible
  by 16 marked ``tt.divisibility = 16`` (e.g. ``stride_qh = 72`` is not, a unit stride becomes the constant
  1), dtypes, ``num_warps`` / ``num_stages``. An autotuned launch is recorded once per configuration the
  autotuner would choose from on a GPU (all of them, after its pruning), grouped by the autotuner's cache
  key. Nothing is launched, so the outputs are uninitialised memory; launches depend on shapes, strides
  and host-side schedules only.
* **Compile** (:func:`compile_case`): a recorded :class:`CompileCase` is compiled through Triton's CUDA
  backend (MLIR passes and the bundled ptxas, down to a cubin); the result carries shared memory,
  registers, stack frame, the ptxas log and the SASS (``cuobjdump -sass``).

The capture also keeps each launch's compile exactly as Triton's JIT would run it (:class:`ExactCompile`, in the
JIT's own types, under its cache key): :func:`compile_exact` fills the Triton cache entry a GPU launch looks up
(``benchmarks/precompile.py``), and :func:`jit_lookups` sends launches through the JIT with a stand-in driver to
check that it finds them there.

Both run in worker processes started with :func:`init_worker`, which turns the interpreter off before
packdit is imported there: the test session imports packdit's kernels under ``TRITON_INTERPRET=1`` (as
interpreter functions, which can neither be compiled nor recorded). This module imports neither triton nor
packdit at import time for that reason.

The capture relies on Triton 3.6 internals (``create_function_from_signature``, ``JITFunction._pack_args``,
the ``Autotuner`` key), :func:`jit_lookups` on ``CUDABackend.add_stages`` running only on a cache miss;
:func:`capturing` fails loudly if they change, and the precompile test if the lookups stop matching.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import importlib
import os
import re
import shutil
import subprocess
import tempfile
import traceback

# The launchers' checks that a device can run Triton kernels (CUDA, or the CPU under the interpreter). The
# capture replaces them so that CPU tensors reach the (recorded, not executed) launch.
_RUNNABLE_CHECKS = (
    ("packdit.ops._triton_utils", "require_triton", lambda op, tensor: None),
    # the dispatcher's availability table: explicit backend="triton" requests reach the launchers
    ("packdit.nn.functional", "_UNSUPPORTED",
     {"triton": lambda device: None, "cuda": lambda device: "the capture records Triton launches only"}),
    # The GEMM's TMA kernel is what runs on sm_90, the budgets' target; scenarios with ``tma=False`` capture the
    # pointer kernel that sm_80 runs (kernel_launches._mlp), and the sass section keeps each on its own target.
    ("packdit.ops._triton_utils", "tma_capable", lambda device: True),
)
# Compile options a launch may pass besides num_warps / num_stages (``triton.Config.all_kwargs``), and defaults.
_OTHER_OPTION_DEFAULTS = {"num_ctas": 1, "maxnreg": None}
DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}  # Triton's CUDA defaults


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation, as a launch compiles it.

    Attributes:
        kernel: ``"module:attribute"`` of the kernel (a ``triton.jit`` function, possibly autotuned).
        signature: ``(name, type)`` of the runtime arguments: ``"*bf16"``, ``"i32"``, ``"fp32"``...
        constexprs: ``(name, value)`` of the compile-time arguments, including pointers passed as None and
            integers specialised as the constant 1.
        aligned: runtime arguments specialised as multiples of 16 (16-byte aligned pointers, integers
            divisible by 16), as Triton's launcher does for such values.
        num_warps, num_stages: compile options.
        arch: CUDA compute capability as an int (90 = sm_90).
        options: other compile options the launch passes (``num_ctas``, ``maxnreg``), as ``(name, value)``.
    """

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    aligned: tuple[str, ...]
    num_warps: int
    num_stages: int
    arch: int
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """The compiled kernel: shared memory per block (bytes) from Triton's metadata; registers and stack frame
    per thread (bytes; nonzero means local memory: register spills or a local array) from ``cuobjdump``; the
    ptxas log (``-v`` info and warnings) and the SASS text of the cubin."""

    shared: int
    registers: int
    stack: int
    ptxas_log: str = ""
    sass: str = ""
    seconds: float = 0.0      # wall time of the compilation (and of reading the cubin back)
    cpu_seconds: float = 0.0  # CPU time of it, ptxas and cuobjdump included


def init_worker(cache_dir: str) -> None:
    """Process initializer: real targets (no interpreter), Triton's cache in ``cache_dir``."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_case(case: CompileCase) -> CompileResult:
    """Compile ``case``; a failure is raised as ``RuntimeError`` carrying the compiler's traceback (Triton's
    exceptions do not all survive pickling back to the parent process)."""
    try:
        return _compile(case)
    except Exception:
        raise RuntimeError(traceback.format_exc()) from None


def _jit_function(kernel_path: str):
    import triton

    module_name, attribute = kernel_path.split(":")
    kernel = getattr(importlib.import_module(module_name), attribute)
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap autotune / heuristics
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel_path}: expected a triton.jit function, got {type(kernel).__name__} "
                            "(is TRITON_INTERPRET set in this process?)")
        kernel = kernel.fn
    return kernel


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (ptxas, cuobjdump)."""
    import resource
    import time

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _compile(case: CompileCase) -> CompileResult:
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _jit_function(case.kernel)
    constexprs = dict(case.constexprs)
    signature = dict(case.signature)
    signature.update({name: "constexpr" for name in constexprs})
    missing = set(kernel.arg_names) ^ set(signature)
    if missing:
        raise ValueError(f"{case.kernel}: arguments {sorted(missing)} do not match the kernel's {kernel.arg_names}")
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in case.aligned}
    source = ASTSource(kernel, {name: signature[name] for name in kernel.arg_names},
                       {(index[name],): value for name, value in constexprs.items()}, attrs)
    with _ptxas_log() as log:
        compiled = triton.compile(source, target=GPUTarget("cuda", case.arch, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages,
                                           **dict(case.options)})
    cubin = compiled.asm["cubin"]
    registers, stack = _cubin_resources(cubin)
    log_text, sass = log.text(compiled, case.arch), _sass(cubin)
    return CompileResult(compiled.metadata.shared, registers, stack, log_text, sass, time.perf_counter() - started,
                         _cpu_seconds() - cpu_started)


@dataclasses.dataclass
class ExactCompile:
    """One kernel specialisation with exactly the inputs Triton's JIT passes to ``triton.compile`` for its launch
    (``JITFunction._pack_args``: signature, constexprs, attrs and parsed options, in the JIT's own types and order),
    so that compiling it writes the Triton cache entry that launch looks up. ``key``: that entry's cache key."""

    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str


def _cache_key(source, backend, options: dict) -> str:
    """The key ``triton.compile`` files ``source`` under for ``backend`` (a target's) with ``options``."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key

    return get_cache_key(source, backend, backend.parse_options(options), get_cache_invalidating_env_vars())


def compile_exact(job: ExactCompile) -> float:
    """Compile ``job`` into this process's Triton cache (a hit if it is there); returns the wall seconds. Raises
    ``RuntimeError`` if this process would file it under another key than the recording one (another Triton, other
    kernel sources or cache-invalidating environment variables)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    started = time.perf_counter()
    target = GPUTarget("cuda", job.arch, 32)
    source = ASTSource(_jit_function(job.kernel), job.signature, job.constexprs, job.attrs)
    key = _cache_key(source, make_backend(target), job.options)
    if key != job.key:
        raise RuntimeError(f"{job.kernel}: cache key {key} here, {job.key} where it was recorded")
    try:
        triton.compile(source, target=target, options=job.options)
    except Exception:
        raise RuntimeError(traceback.format_exc()) from None
    return time.perf_counter() - started


class _LogCapture:
    """The ptxas ``-v`` log of one compilation (info, spills and diagnostics such as C7515). Triton prints it
    (``knobs.nvidia.dump_ptxas_log``) only when it runs ptxas; it is saved beside the Triton cache entry for
    later cache hits (a cache entry without it: ptxas runs again on the cached PTX with Triton's flags)."""

    NAME = "ptxas.log"

    def __init__(self, stream):
        self.stream = stream

    def text(self, compiled, arch: int) -> str:
        from triton.runtime.cache import get_cache_manager

        cache = get_cache_manager(compiled.metadata.hash)
        printed = self.stream.getvalue()
        if "ptxas" in printed:
            cache.put(printed, self.NAME, binary=False)
            return printed
        saved = cache.get_file(self.NAME)
        if saved is not None:
            with open(saved) as file:
                return file.read()
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        with tempfile.TemporaryDirectory() as folder:
            source = os.path.join(folder, "kernel.ptx")
            with open(source, "w") as file:
                file.write(compiled.asm["ptx"])
            command = [get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", source,
                       "-o", os.path.join(folder, "kernel.cubin")]
            log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
        cache.put(log, self.NAME, binary=False)
        return log


@contextlib.contextmanager
def _ptxas_log():
    import io

    from triton import knobs

    stream = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(stream):
        knobs.nvidia.dump_ptxas_log = True
        yield _LogCapture(stream)


def _cuda_tool(name: str) -> str:
    """``cuobjdump`` / ``nvdisasm`` bundled with Triton, beside its ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def _run_on_cubin(cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([*args, file.name], check=True, capture_output=True, text=True).stdout


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack frame bytes)`` per thread of the single kernel in ``cubin``."""
    usage = _run_on_cubin(cubin, _cuda_tool("cuobjdump"), "--dump-resource-usage")
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if registers is None or stack is None:
        raise ValueError(f"unexpected cuobjdump output: {usage!r}")
    return int(registers.group(1)), int(stack.group(1))


def _sass(cubin: bytes) -> str:
    return _run_on_cubin(cubin, _cuda_tool("cuobjdump"), "-sass")


# ---------------------------------------------------------------------------------------------- capture
@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded launch of one kernel configuration.

    Attributes:
        cases: the compile case of each target arch, ``((arch, CompileCase), ...)``.
        int_args: ``(name, value)`` of the runtime integer arguments (before specialisation).
        autotune: None for a launch with a fixed configuration, else ``(autotuner key, index of this
            configuration, number of configurations)``; the key (kernel, the autotuner's cache key) is shared
            by the configurations the autotuner chooses between.
        programs: number of programs of the launch grid.
        tags: ``(name, value)`` labels of the scenario that made the launch.
    """

    cases: tuple[tuple[int, CompileCase], ...]
    int_args: tuple[tuple[str, int], ...]
    autotune: tuple | None
    programs: int
    tags: tuple[tuple[str, object], ...]

    def case(self, arch: int) -> CompileCase:
        return dict(self.cases)[arch]


class _Recorder:
    def __init__(self, archs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
        self.binders = {}
        self.launches: list[Launch] = []
        self.exact: dict[str, ExactCompile] = {}  # cache key -> the compile a GPU launch would run
        self.tags: tuple = ()
        self.autotune = None

    def _binder(self, fn, arch):
        from triton.runtime.jit import create_function_from_signature

        key = (id(fn), arch)
        if key not in self.binders:
            self.binders[key] = (fn, create_function_from_signature(fn.signature, fn.params, self.backends[arch]))
        return self.binders[key][1]

    def record(self, fn, args, kwargs, grid) -> None:
        from triton import knobs

        kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode)  # as JITFunction.run
        kernel = f"{fn.fn.__module__}:{fn.fn.__name__}"
        cases, bound = [], None
        for arch, backend in self.backends.items():
            bound, specialization, options = self._binder(fn, arch)(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            self._record_exact(fn, kernel, arch, backend, signature, constexprs, attrs, options)
            cases.append((arch, _case_from_specialization(kernel, fn.arg_names, signature, constexprs, attrs,
                                                          options, kwargs, arch)))
        int_args = tuple((param.name, bound[param.name]) for param in fn.params if not param.is_constexpr
                         and isinstance(bound[param.name], int) and not isinstance(bound[param.name], bool))
        grid = grid(bound) if callable(grid) else grid
        programs = 1
        for size in grid:
            programs *= int(size)
        self.launches.append(Launch(tuple(cases), int_args, self.autotune, programs, self.tags))

    def _record_exact(self, fn, kernel: str, arch: int, backend, signature, constexprs, attrs, options) -> None:
        from triton.compiler import ASTSource

        options = dict(options.__dict__)  # what JITFunction._do_compile passes to triton.compile
        key = _cache_key(ASTSource(fn, signature, constexprs, attrs), backend, options)
        self.exact.setdefault(key, ExactCompile(kernel, arch, signature, constexprs, attrs, options, key))

    def record_autotuned(self, tuner, args, kwargs) -> None:
        """The configurations ``tuner`` (a ``triton.autotune`` object) would benchmark for this launch."""
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        named = {name: value for name, value in named.items() if name in tuner.arg_names}
        key = [named[name] for name in tuner.keys if name in named]  # Autotuner.run's cache key
        key += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
        base = tuner.base_fn
        group = (f"{base.__module__}:{base.__name__}", *key)
        configs = _tried_configs(tuner, args, kwargs)
        for index, config in enumerate(configs):
            self.autotune = (group, index, len(configs))
            try:
                _run_config(tuner, config, args, kwargs)
            finally:
                self.autotune = None


def _case_from_specialization(kernel, arg_names, signature, constexprs, attrs, options, kwargs, arch) -> CompileCase:
    """A :class:`CompileCase` from the ``(signature, constexprs, attrs, options)`` Triton's launcher computed."""
    for path, values in attrs.items():
        if len(path) != 1 or any(value != ["tt.divisibility", 16] for value in values):
            raise ValueError(f"{kernel}: unsupported specialisation {path}: {values} (tuple arguments?)")
    if any(len(path) != 1 for path in constexprs):
        raise ValueError(f"{kernel}: tuple arguments are not supported")
    constants = {arg_names[path[0]]: value for path, value in constexprs.items()}
    runtime = tuple((name, kind) for name, kind in signature.items() if name not in constants)
    aligned = tuple(arg_names[path[0]] for path, values in attrs.items() if values)
    extra = tuple((name, getattr(options, name)) for name, default in _OTHER_OPTION_DEFAULTS.items()
                  if getattr(options, name) != default)
    return CompileCase(kernel, runtime, tuple(constants.items()), aligned, options.num_warps, options.num_stages,
                       arch, extra)


@contextlib.contextmanager
def uninitialized_math(min_elements: int = 1 << 16):
    """Within the block, PyTorch's own (aten) operations that compute floating-point tensors from or into such
    tensors of at least ``min_elements`` elements (a projection, or a bias gradient's sum over tokens) return them
    uninitialised, with the shapes, dtypes and strides of PyTorch's meta functions, and in-place ones on such
    tensors do nothing. A capture of a whole model's training step at GPU sizes (``benchmarks/e2e.py``: 131k
    tokens, width 1152) then records its Triton launches without computing its projections, position
    embeddings and elementwise passes: ~16 s for its 41 steps on two cores, where leaving only the matrix
    products and convolutions uninitialised took ~4 minutes, for the same 86 compiles. Like a recorded launch's
    outputs, those values are never read. What the launches depend on runs as it is: views (a head's q, k, v are
    views of the projection, and the launch specialises on their offsets), integer and boolean results (indices,
    masks, the layout's metadata), results whose shape depends on values (``nonzero``), small tensors, and every
    operation outside aten (packdit's custom ops, whose launchers make the recorded launches)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten, tree_map_only

    def tensors(tree) -> list:
        return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

    def large(tree) -> bool:
        return any(t.is_floating_point() and t.numel() >= min_elements for t in tensors(tree))

    def floats(tree) -> bool:
        return bool(tensors(tree)) and all(t.is_floating_point() for t in tensors(tree))

    def meta_result(func, args, kwargs):
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        if "device" in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")
        try:
            return func(*meta_args, **meta_kwargs)
        except Exception:  # noqa: BLE001 -- no meta function, or a shape that depends on values: compute it
            return None

    class UninitializedMath(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "aten" and not func.is_view:
                if func._schema.is_mutable:
                    if func._schema.name.endswith("_") and args and floats(args[0]) and large(args[0]):
                        return args[0]  # in place: returns self
                else:
                    meta = meta_result(func, args, kwargs)
                    if meta is not None and floats(meta) and (large(meta) or large((args, kwargs))):
                        return tree_map_only(torch.Tensor, lambda m: torch.empty_strided(
                            m.shape, m.stride(), dtype=m.dtype), meta)
            return func(*args, **kwargs)

    with UninitializedMath():
        yield


@contextlib.contextmanager
def capturing(archs=(90, 80)):
    """Within the block, Triton launches are recorded (for each target in ``archs``), not run; yields the
    recorder, whose ``launches`` list grows and whose ``tags`` label the launches that follow."""
    recorder = _Recorder(archs)

    def jit_run(fn, *args, grid, warmup, **kwargs):
        recorder.record(fn, args, kwargs, grid)

    def autotune_run(tuner, *args, **kwargs):
        recorder.record_autotuned(tuner, args, kwargs)

    with _launches_replaced(jit_run, autotune_run):
        yield recorder


@contextlib.contextmanager
def jit_lookups(arch: int):
    """Within the block, every Triton launch (every configuration of an autotuned one) goes through Triton's JIT
    as on a GPU of compute capability ``arch`` (a stand-in driver: CPU tensors stand in for the GPU's), which
    loads the kernel from Triton's cache or compiles it, and is then not launched. Yields the list of the kernels
    the JIT compiled, i.e. did not find in the cache."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class StandIn:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    compiled = []
    add_stages, jit = CUDABackend.add_stages, JITFunction.run

    def compiling(backend, stages, options, language):  # only a cache miss gets this far in triton.compile
        compiled.append(f"{options.num_warps} warps, {options.num_stages} stages")
        return add_stages(backend, stages, options, language)

    def jit_run(fn, *args, grid, warmup, **kwargs):
        count = len(compiled)
        jit(fn, *args, grid=grid, warmup=True, **kwargs)
        compiled[count:] = [f"{fn.fn.__name__} ({what})" for what in compiled[count:]]

    def autotune_run(tuner, *args, **kwargs):
        for config in _tried_configs(tuner, args, kwargs):
            _run_config(tuner, config, args, kwargs)

    previous = driver.active if driver._active is not None else None  # the default driver needs a GPU
    driver.set_active(StandIn())
    CUDABackend.add_stages = compiling
    try:
        with _launches_replaced(jit_run, autotune_run):
            yield compiled
    finally:
        CUDABackend.add_stages = add_stages
        driver.set_active(previous)


def _tried_configs(tuner, args, kwargs) -> list:
    """The configurations autotuner ``tuner`` tries for a launch, after its pruning."""
    tuner.nargs = dict(zip(tuner.arg_names, args))
    configs = tuner.prune_configs(kwargs)
    tuner.nargs = None
    return configs


def _run_config(tuner, config, args, kwargs) -> None:
    """``tuner``'s kernel launched with ``config``, its ``pre_hook`` first as ``Autotuner.run`` does (e.g. the block
    shapes of tensor descriptors)."""
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(tuner.arg_names, args)), **kwargs, **config.all_kwargs()})
    tuner.fn.run(*args, **kwargs, **config.all_kwargs())


@contextlib.contextmanager
def _launches_replaced(jit_run, autotune_run):
    """Within the block, ``JITFunction.run`` is ``jit_run``, ``Autotuner.run`` is ``autotune_run`` and the launchers'
    device checks let CPU tensors through (_RUNNABLE_CHECKS)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("capturing needs a process without TRITON_INTERPRET (see init_worker)")
    saved = [(JITFunction, "run", JITFunction.run), (Autotuner, "run", Autotuner.run)]
    for module_name, attribute, _ in _RUNNABLE_CHECKS:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise AttributeError(f"{module_name}.{attribute} is gone: update triton_aot._RUNNABLE_CHECKS to the "
                                 "launchers' device check")
        saved.append((module, attribute, getattr(module, attribute)))
    try:
        JITFunction.run, Autotuner.run = jit_run, autotune_run
        for module_name, attribute, replacement in _RUNNABLE_CHECKS:
            setattr(importlib.import_module(module_name), attribute, replacement)
        yield
    finally:
        for owner, attribute, value in saved:
            setattr(owner, attribute, value)


# ---------------------------------------------------------------------------------------------- workers
class Workers:
    """``processes`` worker processes (:func:`init_worker`) sharing one Triton cache, for captures and compiles
    (both CPU-bound and single-threaded). Captures and compiles are memoised: several test modules (or
    sections) asking for the same scenario or case share one run."""

    def __init__(self, processes: int, cache_dir: str, archs=(90, 80)):
        import concurrent.futures
        import multiprocessing

        self.pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=init_worker, initargs=(cache_dir,))
        self.archs = tuple(archs)
        self.captures: dict = {}
        self.compiles: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    def captured(self, scenarios) -> list[Launch]:
        """The launches of ``scenarios`` (``kernel_launches.capture``, one scenario per task), in scenario order."""
        import kernel_launches

        scenarios = list(scenarios)
        for scenario in scenarios:
            if scenario not in self.captures:
                self.captures[scenario] = self.pool.submit(kernel_launches.capture, [scenario], self.archs)
        return [launch for scenario in scenarios for launch in self.captures[scenario].result()]

    def compile(self, case: CompileCase):
        """A future of :func:`compile_case`."""
        if case not in self.compiles:
            self.compiles[case] = self.pool.submit(compile_case, case)
        return self.compiles[case]


@functools.cache
def shared_workers(processes: int = 2) -> Workers:
    """One :class:`Workers` per process (e.g. a test session), closed at exit, with the Triton cache
    ``TRITON_CACHE_DIR`` (kept across sessions) or else a fresh one."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache:
        cache = tempfile.mkdtemp(prefix="packdit-triton-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    workers = Workers(processes, cache)
    atexit.register(workers.close)
    return workers


def unique_cases(launches: list[Launch], arch: int) -> dict[CompileCase, list[Launch]]:
    """The distinct compile cases of ``launches`` for ``arch``, each with the launches that compile it, in first
    launch order."""
    cases: dict[CompileCase, list[Launch]] = {}
    for launch in launches:
        cases.setdefault(launch.case(arch), []).append(launch)
    return cases


def first_per_kernel(cases: dict[CompileCase, list[Launch]]) -> dict[CompileCase, list[Launch]]:
    """The first case of each kernel in ``cases`` (from :func:`unique_cases`): one configuration per kernel."""
    first: dict = {}
    for case, launches in cases.items():
        first.setdefault(case.name, (case, launches))
    return dict(first.values())


def case_label(case: CompileCase) -> str:
    """A short id: kernel, dtype, tile constexprs and flags, warps/stages, arch (``attention_fwd-bf16-d72-m128-
    n64-rope-w8s3-sm90``)."""
    values = dict(case.constexprs)
    signature = dict(case.signature)
    dtype = next((re.sub(r"^\*|^tensordesc<|\[.*$", "", signature[name])
                  for name in ("Q", "X", "a_ptr", "a_desc", "x_ptr", "dout_ptr", "pre_ptr", "partials_ptr", "Out")
                  if name in signature), "")
    parts = [case.name.strip("_").removesuffix("_kernel"), dtype]
    for name, label in (("HEAD_DIM", "d"), ("BLOCK_M", "m"), ("BLOCK_N", "n"), ("BLOCK_K", "k"), ("BLOCK_D", "bd"),
                        ("CHUNK", "c"), ("BLOCK", "b"), ("GROUP", "g"), ("EPILOGUE", "epi")):
        if name in values and not (name == "BLOCK_D" and "HEAD_DIM" in values):
            parts.append(f"{label}{values[name]}")
    for flag in ("W_KN", "NORM", "ROPE", "ONE_BLOCK", "DQ_MODE", "HAS_GRAD_LSE", "IS_RMS", "HAS_WEIGHT", "HAS_BIAS"):
        if flag == "DQ_MODE":  # the dK/dV kernel's dQ: "atomic_dq", "single_dq" (none: the dQ kernel's)
            parts += [f"{values[flag]}_dq"] if values.get(flag, "separate") != "separate" else []
        elif values.get(flag):
            parts.append(flag.lower().removeprefix("has_").removeprefix("is_"))
    parts += [f"w{case.num_warps}s{case.num_stages}", f"sm{case.arch}"]
    return "-".join(parts)
