"""What packdit's launchers launch: the model and op calls whose Triton launches the static tools compile.

One description of "what runs", shared by the sass section of the benchmark runner
(``benchmarks/sass.py``), the SASS budget tests and the compile tests. Each :class:`Scenario` runs real
packdit code -- a one- or two-block DiT of a published configuration, or one op module -- forward and
backward on CPU tensors inside :func:`triton_aot.capturing`, which records every Triton launch (with the
specialisation Triton computes for it) instead of running it. So the recorded kernels see exactly the
tensors the model passes: q/k/v as strided views of the fused qkv projection (row stride 3 H D) or the
contiguous output of the qk-norm, modulation rows as chunks of the adaLN output (row stride 6 D), unit
strides as the constant 1, head dim 72's head stride of 72 (not a multiple of 16), each launcher's warps,
stages, tile sizes and every autotuning configuration.

Token counts. Strides and widths depend on the model only, but a few integer arguments scale with the
pack (token count N, modulation rows R, tile counts, GEMM rows M). Triton specialises such a value when it
is 1 or a multiple of 16; a training run sees both variants, most often (15 in 16 packs) the unspecialised
one, which is what the layouts here produce: every layout's token count is neither 1 nor a multiple of 16
and every pack holds at least two samples. :func:`token_count_dependence` recaptures a scenario with one
and two extra one-token samples and reports the arguments whose specialisation changes; the compile tests
check that the captured layouts give the majority (the generic) specialisation.

Layouts (patch grids ``(T, H, W)``) are chosen for the attention query tile size (BLOCK_M) the schedule picks:
"long" keeps 128-row tiles (DiT-XL/2 at 256 px is one 16 x 16 grid), "medium" 64, "short" 32, "tiny" 16 (key
tiles have at least 64 rows); the video layout gives 128-row spatial tiles and 64-row packed temporal tiles
(T = 9: 7 spatial positions per tile). "medium" and "short" hold one sample of more than 64 tokens, so their
programs loop over key (query) blocks; "tiny" and the temporal tiles fit one block, and their programs loop
over heads (ONE_BLOCK).
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

from triton_aot import Launch, capturing

LAYOUTS = {
    "long": ((1, 16, 16), (1, 15, 17)),                        # 511 tokens, BLOCK_M 128
    "medium": ((1, 8, 8), (1, 8, 8), (1, 7, 9), (1, 12, 16)),  # 383 tokens, BLOCK_M 64
    "short": ((1, 4, 8), (1, 4, 8), (1, 5, 6), (1, 8, 12)),    # 190 tokens, BLOCK_M 32
    "tiny": ((1, 4, 4), (1, 3, 5), (1, 4, 4)),                 # 47 tokens, BLOCK_M 16, one key block
    "video": ((9, 8, 14), (1, 15, 17)),                        # 1,263 tokens: spatial BLOCK_M 128, temporal 64
}
ATTENTION_LAYOUTS = ("long", "medium", "short", "tiny")

# name -> DiT constructor arguments (packdit.models.dit.DiT_models and the widths the kernels are tuned for)
MODELS = {
    "DiT-XL/2": dict(hidden_size=1152, num_heads=16, patch_size=2),                   # hd 72, q/k/v views of qkv
    "STDiT-XL/2": dict(hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), qk_norm=True,
                       attention="spatial_temporal"),                              # hd 72, spatial + temporal
    "DiT-B/2": dict(hidden_size=768, num_heads=12, patch_size=2),                     # hd 64
    "DiT-2B": dict(hidden_size=2048, num_heads=16, patch_size=(1, 2, 2), qk_norm=True),  # hd 128, width 2048
    "DiT-3B": dict(hidden_size=3072, num_heads=24, patch_size=(1, 2, 2), qk_norm=True),  # hd 128, width 3072
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A packdit call to capture. ``kind``: "model" (DiT blocks + final layer, forward and backward with the
    default dQ design), "attention" (``PackedAttention`` forward, backward by default and in deterministic mode:
    the dQ kernel), "mlp" (``FusedMLP``: without residual the bias epilogue, else the gated one) or "norm"
    (``ModulatedNorm`` into ``GatedResidual``). ``params``: the runner's keyword arguments."""

    name: str
    kind: str
    params: tuple[tuple[str, object], ...]

    @property
    def tags(self) -> dict:
        return dict(self.params, scenario=self.name)


def _model(name: str, rope: bool, layout: str, dtype: str = "bf16") -> Scenario:
    overrides = dict(MODELS[name], pos_embed="rope3d" if rope else "sincos2d")
    return Scenario(f"{name}{' rope' if rope else ''} {layout}", "model",
                    (("model", name), ("overrides", tuple(overrides.items())), ("layout", layout), ("dtype", dtype),
                     ("width", overrides["hidden_size"]), ("rope", rope)))


def _attention(width: int, heads: int, layout: str, rope: bool, kv_heads: int | None = None, qk_norm: bool = False,
               mode: str = "full", dtype: str = "bf16", lse: bool = False) -> Scenario:
    """``lse``: ``varlen_attention(..., return_lse=True)`` on q/k/v tensors with a loss of both outputs (the delta
    kernel's dlse variant), instead of the ``PackedAttention`` module, whose loss reaches the output only."""
    group = f" gqa{heads // kv_heads}" if kv_heads else ""
    features = f"{group}{' qk-norm' if qk_norm else ''}{' rope' if rope else ''}{' lse' if lse else ''}"
    return Scenario(f"attention {width}/{heads}{features} {mode} {layout} {dtype}", "attention",
                    (("width", width), ("heads", heads), ("kv_heads", kv_heads), ("qk_norm", qk_norm), ("mode", mode),
                     ("layout", layout), ("rope", rope), ("dtype", dtype), ("lse", lse)))


def _mlp(width: int, tokens: int, dtype: str = "bf16", gated: bool = False, bias: bool = True,
         tma: bool = True) -> Scenario:
    """``tma=False``: the GEMM without TMA descriptors (pointer loads), what GPUs before sm_90 run; the capture
    otherwise records the sm_90 TMA kernel (``triton_aot._RUNNABLE_CHECKS``)."""
    features = f"{' gated' if gated else ''}{'' if bias else ' no-bias'}{'' if tma else ' pointer'}"
    return Scenario(f"mlp {width}{features} {dtype}", "mlp",
                    (("width", width), ("tokens", tokens), ("dtype", dtype), ("gated", gated), ("bias", bias),
                     ("tma", tma)))


def _norm(width: int, norm_type: str, affine: bool, dtype: str) -> Scenario:
    return Scenario(f"norm {width} {norm_type}{' affine' if affine else ''} {dtype}", "norm",
                    (("width", width), ("norm_type", norm_type), ("affine", affine), ("dtype", dtype)))


# The production set (bf16): the sass section and the budget tests.
PRODUCTION = (
    *(_model(name, rope, "video" if name == "STDiT-XL/2" else "long")
      for name in MODELS for rope in (False, True)),
    *(_attention(width, heads, layout, rope, mode=mode) for width, heads in ((768, 12), (1152, 16), (3072, 24))
      for layout, mode in [*((layout, "full") for layout in ATTENTION_LAYOUTS), ("video", "temporal")]
      for rope in (False, True)),
    # Head dims 80 and 96 (64 + 16 and 64 + 32 column chunks): 128-row and temporal tiles.
    *(_attention(width, 16, layout, False, mode=mode) for width in (1280, 1536)
      for layout, mode in (("long", "full"), ("video", "temporal"))),
    _attention(3072, 24, "long", True, kv_heads=8, qk_norm=True),
    _attention(2048, 16, "long", False, kv_heads=8),
    _attention(1152, 16, "long", False, kv_heads=8),
    _mlp(1152, 300), _mlp(3072, 300),
    _mlp(1152, 300, tma=False), _mlp(3072, 300, tma=False),
)
# What the SASS budget tests (and the default compile tests) read: attention tiles of 128 rows ("long") and
# temporal mode ("video") with RoPE off and on, tiles of 64, 32 and 16 rows ("medium", "short", "tiny") with RoPE
# off (RoPE runs in the QK-norm / RoPE kernel: the attention kernels a RoPE-on tile launches are the RoPE-off ones).
# The smaller tiles with RoPE and the pointer GEMM are in the sass section's report only.
BUDGETED = tuple(s for s in PRODUCTION if s.tags.get("tma", True)
                 and not (s.tags.get("layout") in ("medium", "short", "tiny") and s.tags.get("rope")))
# Beyond production, for the compile tests: head dim 256, fp32 / fp16 inputs, every tile size, GQA, the QK-norm
# without and with RoPE at every head dim (fp32 / fp16), the GEMM without bias, LayerNorm / RMSNorm with and
# without affine parameters at widths 64 and 4096 (BLOCK_D 64, 4096) with the gated residual.
COVERAGE = (
    *(_attention(2048, 8, layout, rope) for layout in ATTENTION_LAYOUTS for rope in (False, True)),
    *(_attention(width, heads, layout, rope, dtype=dtype, kv_heads=heads // 2, qk_norm=layout == "long")
      for dtype in ("fp32", "fp16") for width, heads in ((768, 12), (1152, 16), (2048, 16), (2048, 8))
      for layout in ("long", "tiny") for rope in (False, True)),
    *(_mlp(width, 77, dtype, gated) for dtype in ("fp32", "fp16") for width in (64, 1152, 4096)
      for gated in (False, True)),
    _mlp(1152, 77, bias=False), _mlp(1152, 300, gated=True, tma=False),
    _attention(1152, 16, "long", False, lse=True),
    *(_norm(width, norm_type, affine, dtype) for dtype in ("bf16", "fp16", "fp32") for width in (64, 4096)
      for norm_type in ("layer", "rms") for affine in (False, True)),
)


# ---------------------------------------------------------------------------------------------- runners
def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _seqs(layout: str, extra_tokens: int):
    from packdit.layout import PackedSeqs

    return PackedSeqs.from_grids(list(LAYOUTS[layout]) + [(1, 1, 1)] * extra_tokens)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    import packdit

    packdit.use_deterministic(enabled)
    try:
        yield
    finally:
        packdit.use_deterministic(False)


def _backward(forward, deterministic_too: bool) -> None:
    """Forward and backward by default (dQ added once or by atomics in the dK/dV kernel where
    ``attention._dq_mode`` says so), then (``deterministic_too``) with the deterministic kernels."""
    for deterministic in (False, True)[:1 + deterministic_too]:
        with _deterministic(deterministic):
            out = forward()
            out.backward(out.detach().clone())


def _run_model(model: str, overrides, layout: str, dtype: str, extra_tokens: int, **_) -> None:
    import torch

    from packdit.models.dit import DiT

    overrides = dict(overrides)
    depth = 2 if overrides.get("attention") == "spatial_temporal" else 1
    with torch.device("meta"):  # uninitialised weights: the launches depend on shapes only, not values
        net = DiT(depth=depth, backend="triton", **overrides).to(_torch_dtype(dtype))
    net.to_empty(device="cpu")
    seqs = _seqs(layout, extra_tokens)
    patch_width = net.x_embedder.proj.weight[0].numel()  # C * pt * ph * pw
    tokens = torch.randn(seqs.num_tokens, patch_width, dtype=_torch_dtype(dtype))
    t = torch.rand(len(seqs)) * 1000
    y = torch.zeros(len(seqs), dtype=torch.long)
    _backward(lambda: net.forward_packed(tokens, seqs, t, y), deterministic_too=False)


def _run_attention(width: int, heads: int, kv_heads, qk_norm: bool, mode: str, layout: str, rope: bool, dtype: str,
                   lse: bool, extra_tokens: int, **_) -> None:
    import torch

    from packdit.models.config import default_rope
    from packdit.nn.attention import PackedAttention
    from packdit.ops.attention import varlen_attention

    seqs = _seqs(layout, extra_tokens)
    rope = default_rope(width // heads) if rope else None
    if lse:
        q, k, v = (torch.randn(seqs.num_tokens, heads if i == 0 else kv_heads or heads, width // heads,
                               dtype=_torch_dtype(dtype), requires_grad=True) for i in range(3))

        def forward():
            out, lse = varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode=mode, seqs=seqs, rope=rope,
                                        return_lse=True)
            return out.float().sum() + lse.sum()

        _backward(forward, deterministic_too=True)
        return
    module = PackedAttention(width, heads, num_kv_heads=kv_heads, qk_norm=qk_norm, mode=mode, backend="triton",
                             rope=rope).to(_torch_dtype(dtype))
    x = torch.randn(seqs.num_tokens, width, dtype=_torch_dtype(dtype), requires_grad=True)
    _backward(lambda: module(x, seqs), deterministic_too=True)


def _run_mlp(width: int, tokens: int, dtype: str, gated: bool, bias: bool, tma: bool, extra_tokens: int,
             **_) -> None:
    import torch

    from packdit.nn.mlp import FusedMLP
    from packdit.ops import _triton_utils

    module = FusedMLP(width, 4 * width, bias=bias, backend="triton").to(_torch_dtype(dtype))
    count = tokens + extra_tokens
    h = torch.randn(count, width, dtype=_torch_dtype(dtype), requires_grad=True)
    residual = {}
    if gated:
        rows = 3
        residual = dict(x=torch.randn(count, width, dtype=h.dtype), gate=torch.randn(rows, width, dtype=h.dtype),
                        index=torch.arange(count, dtype=torch.int32) % rows)
    with mock.patch.object(_triton_utils, "tma_capable", lambda device: tma):
        out = module(h, **residual)
        out.backward(out.detach().clone())


def _run_norm(width: int, norm_type: str, affine: bool, dtype: str, extra_tokens: int, **_) -> None:
    """``x + gate * ModulatedNorm(x)`` over 3 modulation rows (one per sample of 300 tokens' sorted index)."""
    import torch

    from packdit.nn.modulate import GatedResidual, ModulatedNorm

    norm = ModulatedNorm(width, norm_type, elementwise_affine=affine, backend="triton").to(_torch_dtype(dtype))
    count, rows = 300 + extra_tokens, 3
    x = torch.randn(count, width, dtype=_torch_dtype(dtype), requires_grad=True)
    shift, scale, gate = (torch.randn(rows, width, dtype=x.dtype, requires_grad=True) for _ in range(3))
    index = (torch.arange(count) * rows // count).to(torch.int32)
    out = GatedResidual(backend="triton")(x, norm(x, shift, scale, index), gate, index)
    out.backward(out.detach().clone())


_RUNNERS = {"model": _run_model, "attention": _run_attention, "mlp": _run_mlp, "norm": _run_norm}


def capture(scenarios, archs=(90, 80), extra_tokens: int = 0) -> list[Launch]:
    """The launches of ``scenarios`` (run in a worker process, see ``triton_aot.init_worker``), tagged with
    their scenario; ``extra_tokens`` one-token samples are added to every pack."""
    import torch

    torch.manual_seed(0)
    with capturing(archs) as recorder:
        for scenario in scenarios:
            recorder.tags = tuple(scenario.tags.items())
            _RUNNERS[scenario.kind](extra_tokens=extra_tokens, **dict(scenario.params))
    if not recorder.launches:
        raise RuntimeError("no Triton launch was recorded: did the launchers take their torch fallback?")
    return recorder.launches


def recorded_keys(scenarios, arch: int = 90, uninitialized_from: int | None = None) -> set[str]:
    """The cache keys of the compiles ``scenarios``' launches make for ``arch``, captured with PyTorch's math
    computed (``uninitialized_from`` None) or left uninitialised on floating-point tensors of at least that many
    elements (``triton_aot.uninitialized_math``); run in a worker process (``triton_aot.init_worker``)."""
    import contextlib

    import triton_aot

    math = contextlib.nullcontext() if uninitialized_from is None else triton_aot.uninitialized_math(
        uninitialized_from)
    with triton_aot.capturing((arch,)) as recorder, math:
        for scenario in scenarios:
            _RUNNERS[scenario.kind](extra_tokens=0, **dict(scenario.params))
    return set(recorder.exact)


def jit_misses(scenarios, arch: int = 90, precompile: bool = True) -> list[str]:
    """The kernels Triton's JIT compiles, i.e. does not find in this process's Triton cache, when ``scenarios``
    launch as on a GPU of compute capability ``arch`` (``triton_aot.jit_lookups``), after (``precompile``) the
    compiles their recording names (``triton_aot.ExactCompile``: what benchmarks/precompile.py compiles) went into
    that cache (run in a worker process, see ``triton_aot.init_worker``)."""
    import triton_aot

    def launch_all():
        for scenario in scenarios:
            _RUNNERS[scenario.kind](extra_tokens=0, **dict(scenario.params))

    if precompile:
        with triton_aot.capturing((arch,)) as recorder:
            launch_all()
        for job in recorder.exact.values():
            triton_aot.compile_exact(job)
    with triton_aot.jit_lookups(arch) as compiled:
        launch_all()
    return compiled


def token_count_dependence(scenario: Scenario, archs=(90,)) -> dict[tuple[str, str], list[str]]:
    """``{(kernel, argument): [specialisation with 0, 1, 2 extra one-token samples]}`` for the integer
    arguments of ``scenario``'s launches whose specialisation ("1", "16" for divisible by 16, "" for neither)
    changes with the token count. The extra samples may change tile sizes (constexprs), not the launches."""
    runs = [capture([scenario], archs, extra) for extra in (0, 1, 2)]
    kernels = [[launch.case(archs[0]).kernel for launch in run] for run in runs]
    if kernels[1] != kernels[0] or kernels[2] != kernels[0]:
        raise RuntimeError(f"{scenario.name}: extra tokens changed the sequence of launched kernels")
    changed: dict[tuple[str, str], list[str]] = {}
    for kernel, *launches in zip(kernels[0], *runs):
        for name, _ in launches[0].int_args:
            kinds = ["1" if value == 1 else "16" if value % 16 == 0 else ""
                     for value in (dict(launch.int_args)[name] for launch in launches)]
            if len(set(kinds)) > 1:
                changed[(kernel, name)] = kinds
    return changed
