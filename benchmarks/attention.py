"""Section ``attention``: packed varlen attention, packdit's Triton kernel vs the strongest peers.

Cases: mix x head dim (64, 72, 128) x RoPE (off / on) x mode (full / spatial / temporal), most valuable
first (video-mix, full attention; then GQA, temporal, spatial, RoPE, the other factorized cases, long videos,
images).
Model width 1152 (heads = 1152 / head dim, as DiT-XL/STDiT; GQA: 2 query heads per kv head at hd 72, 3 at
hd 128), bf16, a 49k-token pack per mix from ``workloads.take_tokens``.

Providers, on the same q, k, v:
    packdit        packdit.varlen_attention (Triton), q and k rotated once by the qk_norm_rope kernel
    packdit-atomic-dq, packdit-separate-dq   the same with a dQ design packdit does not pick for the case
                   (full and temporal modes, RoPE off): fp32 atomics in the dK/dV kernel (beside the dQ kernel,
                   or beside dQ added once by the dK/dV programs on temporal tiles), or dQ by its own kernel
    packdit-one-head   the same with one head per program on temporal tiles (temporal mode, RoPE off), where
                   packdit's programs loop over up to ``attention._ONE_BLOCK_HEADS`` heads
    packdit-64-row-fwd   the same with forward programs of at most 64 query rows (spatial mode, RoPE off): a
                   128-row tile runs as two 4-warp programs, two per SM at hd 72 / 128 where a 128-row program
                   (8 warps) has the SM to itself (sm_90 registers and shared memory, static section)
    fa3            FlashAttention-3 varlen (``flash_attn_interface.flash_attn_varlen_func``), when installed
    torch-varlen   torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside PyTorch)
    flash-attn     FlashAttention-2 varlen (``flash_attn.flash_attn_varlen_func``), when installed
    flex           FlexAttention with a document mask (compiled; head dim 128 on video-mix only: one
                   compile per shape and mask, ~30 s each)
    sdpa-loop      one F.scaled_dot_product_attention call per sample (full mode, RoPE off)
    sdpa-padded    pad to (B, H, L_max, D), one SDPA call with a key-padding mask, unpad (copies timed)
The varlen peers run the factorized modes as plain varlen attention: spatial = one segment per frame
(frames are contiguous), temporal = tokens gathered into (h, w, t) order, one segment per spatial
position, and scattered back (the gathers are timed). With RoPE on, the peers get q and k already
rotated, outside the timed call (a conservative comparison: their RoPE costs nothing). At head dim 72,
``torch-varlen-d96`` runs torch-varlen on q, k, v zero-padded to head dim 96 (what a model pays where
a kernel has no 72).

Before timing, every provider's output and its gradients dq, dk, dv (for a random dO) are checked
against the fp32 reference (``packdit.reference.varlen_attention`` after ``apply_rope_3d``), with the
2x rule against the same reference run in bf16 (``common.verify_outputs``); a provider that disagrees
is refused and not timed. Useful FLOPs: ``4 * D * H * pairs`` forward, x3.5 forward+backward
(backward = 2.5x forward), pairs = sum L^2 (full), sum T (HW)^2 (spatial), sum HW T^2 (temporal).
``vs_best_peer`` is packdit's TFLOP/s over the best peer's on the same case and pass; ``rope_overhead`` (packdit's
RoPE-on rows) its time over the same case and pass with RoPE off, minus 1 (goal: <= 0.10); ``dq`` (packdit's rows) the
backward's dQ design: "single" (one add per element by the dK/dV kernel), "atomic" (fp32 atomics in it) or
"separate" (the dQ kernel);
``one_block_heads`` (packdit's temporal rows) the most heads a program takes on temporal tiles; ``fwd_rows``
(packdit's spatial rows) the most query rows a forward program may take, ``fwd_rows_tuned`` (GPU) the rows its
autotuner picked (128-row tiles: 128, or two programs of 64). ``kernel_ms`` /
``kernel_sum_ms`` (fwd+bwd rows; on a GPU packdit's only): the kernels of one call under ``torch.profiler``; the
gap between ``kernel_sum_ms`` and ``ms`` is the time a lone call waits on the host.
``packdit_useful_area``: the share of the scores packdit's tiles compute that attention needs, per case and,
in rows with pass ``static`` (any device), per workload mix and mode, next to ``forward_flop_per_byte``: the
forward's MMA FLOPs as computed (wasted scores included) over its minimum HBM traffic (bf16 q, k, v, out read
or written once), ``computed scores * 4 D / (tokens * 8 D)`` per head, to hold against a GPU's ridge point
(dense bf16 FLOP/s over HBM bytes/s: ~295 on an H100 SXM); below it the layer is bound by memory, and wasted
MMA work costs no time.

CPU (quick): tiny fp32 layouts, head dim 64, with and without GQA; the reference and the SDPA peers are
verified and timed (no performance claims). Under ``TRITON_INTERPRET=1`` (the test suite) packdit's kernel is
verified on one tiny case and not timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    Context,
    OutputMismatch,
    forward_and_grads,
    kernel_times,
    measure,
    print_table,
    refused_row,
    verify_outputs,
)
from workloads import MIXES, patch_grid, take_tokens

import packdit
from packdit import reference
from packdit.determinism import deterministic_enabled
from packdit.layout import PackedSeqs
from packdit.models.config import default_rope
from packdit.ops import attention as attention_op
from packdit.ops.attention_schedule import host_schedule, score_area

MODEL_WIDTH = 1152
HEAD_DIMS = (128, 72, 64)
MODES = ("full", "spatial", "temporal")
TOKEN_BUDGET = 49_152
BACKWARD_FACTOR = 3.5
FLEX_CASES = {("video-mix", 128)}  # (mix, head dim) where flex is compiled, without GQA
# (head dim, query heads per kv head) of the GQA cases at width 1152: 16 / 8 heads at hd 72 (packdit's backward
# computes dQ by its own kernel there), 9 / 3 at hd 128 (atomic dQ on 64-key tiles, as without GQA before)
GQA_CASES = ((72, 2), (128, 3))
CPU_LAYOUTS = {"cpu-videos": [(3, 6, 8), (2, 6, 8), (1, 8, 8)], "cpu-images": [(1, 9, 16), (1, 12, 20), (1, 6, 8)]}
INTERPRETER_LAYOUT = [(2, 3, 4), (1, 4, 4)]  # small enough for the Triton interpreter (~1 s fwd+bwd)
CPU_HEADS = 2
GRAD_NAMES = ["out", "dq", "dk", "dv"]
# relative error allowed on top of 2x the same-precision reference's error
TOLERANCE = {torch.bfloat16: 2e-3, torch.float32: 1e-5}


@dataclasses.dataclass(frozen=True)
class Case:
    mix: str
    head_dim: int
    rope: bool
    mode: str
    group: int = 1  # query heads per key/value head (GQA)

    @property
    def heads(self) -> int:
        """Query heads: model width / head dim on a GPU; on the CPU ``CPU_HEADS`` key/value heads' worth."""
        if self.mix in CPU_LAYOUTS or self.mix == "interpreter":
            return CPU_HEADS * self.group
        return MODEL_WIDTH // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.heads // self.group


@dataclasses.dataclass(frozen=True)
class Provider:
    """``fn(q, k, v) -> out``; ``fused_rope``: it applies RoPE itself (else it gets rotated q and k);
    ``dq``: packdit's backward design it is verified and timed with (see _dq_design); ``one_block_heads``: the
    most heads per program of packdit's one-block launches, ``fwd_rows``: the most query rows per forward program
    (None: packdit's defaults)."""

    name: str
    fn: Callable
    fused_rope: bool = False
    timed: bool = True
    dq: str = "default"
    one_block_heads: int | None = None
    fwd_rows: int | None = None


@contextlib.contextmanager
def _dq_design(dq: str):
    """packdit's backward computes dQ its default way ("default", ``attention._dq_mode``), by the dQ kernel
    ("separate") or by fp32 atomics in the dK/dV kernel ("atomic"). Its single adds ("single") are only right
    where packdit picks them, so they are not forced."""
    if dq == "default":
        yield
    elif dq in ("separate", "atomic"):
        with mock.patch.object(attention_op, "_dq_mode", lambda *args: dq):
            yield
    else:
        raise ValueError(f"dq: expected 'default', 'separate' or 'atomic', got {dq!r}")


@contextlib.contextmanager
def _design(provider: Provider):
    """packdit as ``provider`` runs it: its dQ design (_dq_design), heads per one-block program and rows per
    forward program."""
    with _dq_design(provider.dq), contextlib.ExitStack() as stack:
        if provider.one_block_heads is not None:
            stack.enter_context(mock.patch.object(attention_op, "_ONE_BLOCK_HEADS", provider.one_block_heads))
        if provider.fwd_rows is not None:
            rows = attention_op._fwd_rows
            stack.enter_context(mock.patch.object(attention_op, "_fwd_rows", lambda *args: min(
                rows(*args), provider.fwd_rows)))
        yield


def _schedule(seqs: PackedSeqs, case: Case):
    """The attention schedule packdit builds for ``case`` (on the host)."""
    grids = seqs.grids if case.mode != "full" else None
    return host_schedule(case.mode, seqs.seqlens, None, grids, seqs.num_tokens, torch.device("cpu"))


def _default_dq(schedule, case: Case, dtype: torch.dtype) -> str:
    """The dQ design packdit's default backward uses on ``case``: "single", "atomic" or "separate", from the case's
    schedule (_schedule, ``attention._dq_mode``)."""
    return attention_op._dq_mode(schedule.block_kt, schedule.max_k_len, schedule.keys_uncovered, case.head_dim,
                                 dtype.itemsize, case.group, False)


def _other_dq(default: str) -> str:
    """The design timed beside the default: atomics beside the dQ kernel and beside single adds (temporal tiles,
    where the H200 run measured atomics), the dQ kernel beside atomics."""
    return "separate" if default == "atomic" else "atomic"


def _cases(ctx: Context) -> list[Case]:
    if not ctx.is_gpu:
        interpreted = [Case("interpreter", 64, True, "full")] if _interpreter() else []
        return ([Case("cpu-videos", 64, True, mode) for mode in MODES] + [Case("cpu-images", 64, False, "full")]
                + [Case("cpu-images", 64, False, "full", group=CPU_HEADS)] + interpreted)
    return _gpu_cases()


def _gpu_cases() -> list[Case]:
    """The GPU cases, the most informative first (a spent time budget skips the rest)."""
    ordered = [Case("video-mix", d, False, "full") for d in HEAD_DIMS]
    ordered += [Case("long-videos", 128, False, "full")]
    ordered += [Case("video-mix", d, False, "full", group=g) for d, g in GQA_CASES]
    ordered += [Case("video-mix", d, False, "temporal") for d in HEAD_DIMS]  # head loops vs packdit-one-head
    ordered += [Case("video-mix", d, False, "spatial") for d in HEAD_DIMS]  # 128- vs 64-row forward programs
    ordered += [Case("video-mix", d, True, "full") for d in HEAD_DIMS]
    ordered += [Case("video-mix", d, rope, mode) for mode in MODES[1:] for rope in (False, True) for d in HEAD_DIMS]
    ordered += [Case("images", d, rope, "full") for rope in (False, True) for d in HEAD_DIMS]
    ordered += [Case("long-videos", d, rope, mode) for mode in MODES for rope in (False, True) for d in HEAD_DIMS]
    return list(dict.fromkeys(ordered))


def _layout(ctx: Context, mix: str) -> PackedSeqs:
    if mix in CPU_LAYOUTS:
        grids = CPU_LAYOUTS[mix]
    elif mix == "interpreter":
        grids = INTERPRETER_LAYOUT
    else:
        grids = _mix_grids(mix)
    return PackedSeqs.from_grids(grids, device=ctx.device)


def _mix_grids(mix: str) -> list[tuple[int, int, int]]:
    """Patch grids of the GPU cases' pack of ``mix``."""
    return [patch_grid(s) for s in take_tokens(mix, TOKEN_BUDGET, seed=0)]


# ---------------------------------------------------------------------------------------------- segments
@dataclasses.dataclass(frozen=True)
class Segments:
    """A mode's attention groups as plain varlen segments: ``cu (S+1,) int32``, the longest, and for the
    temporal mode the token order that makes each group contiguous (``gather``) and its inverse."""

    cu: torch.Tensor
    max_len: int
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None


def _segments(seqs: PackedSeqs, mode: str) -> Segments:
    device = seqs.device
    if mode == "full":
        return Segments(seqs.cu_seqlens, seqs.max_seqlen)
    grids, starts = seqs.grids, seqs.cu_seqlens.tolist()
    if mode == "spatial":  # (t, h, w) raster order: every frame's h*w tokens are contiguous
        sizes = [h * w for t, h, w in grids for _ in range(t)]
        gather = None
    else:
        sizes = [t for t, h, w in grids for _ in range(h * w)]
        gather = np.concatenate([start + np.arange(t * h * w).reshape(t, h * w).T.reshape(-1)
                                 for start, (t, h, w) in zip(starts, grids)] or [np.zeros(0, np.int64)])
    cu = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32, device=device)
    if gather is None:
        return Segments(cu, max(sizes, default=0))
    gather_t = torch.as_tensor(gather, device=device)
    return Segments(cu, max(sizes, default=0), gather_t, torch.argsort(gather_t))


def _on_segments(attend: Callable, segments: Segments) -> Callable:
    """``attend(q, k, v, cu, max_len)`` on the mode's segments, gathering/scattering the temporal order."""
    cu, max_len, gather, scatter = segments.cu, segments.max_len, segments.gather, segments.scatter

    def fn(q, k, v):
        if gather is None:
            return attend(q, k, v, cu, max_len)
        return attend(q[gather], k[gather], v[gather], cu, max_len)[scatter]

    return fn


# ---------------------------------------------------------------------------------------------- providers
def _torch_varlen(q, k, v, cu, max_len):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len)


def _padded_head_dim(attend: Callable, head_dim: int) -> Callable:
    """``attend`` on q, k, v zero-padded to ``head_dim``; q pre-scaled so the softmax scale stays D ** -0.5."""

    def fn(q, k, v, cu, max_len):
        pad = (0, head_dim - q.shape[-1])
        q = q * math.sqrt(head_dim / q.shape[-1])
        return attend(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), cu, max_len)[..., :v.shape[-1]]

    return fn


def _fa3(q, k, v, cu, max_len):
    from flash_attn_interface import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
    return out[0] if isinstance(out, tuple) else out  # older FA3 builds also return the lse


def _fa2(q, k, v, cu, max_len):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)


def _sdpa_loop(q, k, v, cu, max_len):
    """One (1, H, L, D) SDPA call per sample, as a model would make it (4-D, so PyTorch can pick its flash
    kernel; 3-D input runs its math backend)."""
    bounds = cu.tolist()
    gqa = k.shape[1] != q.shape[1]
    outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), enable_gqa=gqa)[0]
            for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat([o.transpose(0, 1) for o in outs])


def _sdpa_padded(segments: Segments) -> Callable:
    """SDPA on a padded (B, H, L_max, D) batch with a key-padding mask; the pad / unpad copies are timed."""
    cu = segments.cu.long()
    lengths = cu.diff()
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    row = torch.arange(len(sample), device=cu.device) - cu[sample]
    key_valid = (torch.arange(segments.max_len, device=cu.device)[None, :] < lengths[:, None])[:, None, None, :]

    def pad(x):
        padded = x.new_zeros(len(lengths), segments.max_len, *x.shape[1:])
        padded[sample, row] = x
        return padded.transpose(1, 2)

    def fn(q, k, v, _cu, _max_len):
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_valid,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)[sample, row]

    return fn


def _group_ids(seqs: PackedSeqs, mode: str) -> torch.Tensor:
    """(N,) id of each token's attention group: its sample (full), frame (spatial) or (sample, h, w) (temporal)."""
    segment = seqs.segment_ids.long()
    if mode == "full":
        return segment
    pos = seqs.positions.long()
    grid = seqs.grid.long()[segment]
    if mode == "spatial":
        return (seqs.cu_seqlens.long()[segment] + pos[:, 0] * grid[:, 1] * grid[:, 2])
    return seqs.cu_seqlens.long()[segment] + pos[:, 1] * grid[:, 2] + pos[:, 2]


def _flex(seqs: PackedSeqs, mode: str) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    group = _group_ids(seqs, mode)

    def same_group(b, h, q_idx, kv_idx):
        return group[q_idx] == group[kv_idx]

    n = seqs.num_tokens
    # compiled: eager would build the n x n mask (2.4 G entries for a 49k-token pack)
    block_mask = torch.compile(create_block_mask)(same_group, None, None, n, n, device=group.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask)
        return out[0].transpose(0, 1)

    return fn


def _packdit(seqs: PackedSeqs, case: Case, backend: str | None = None) -> Callable:
    rope = default_rope(case.head_dim) if case.rope else None

    def fn(q, k, v):
        return packdit.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode=case.mode, seqs=seqs,
                                        rope=rope, backend=backend)

    return fn


def _packdit_providers(seqs: PackedSeqs, case: Case, default_dq: str, backend: str | None = None) -> list[Provider]:
    """packdit as a GPU case times it: its defaults, and beside them the other dQ design (full and temporal), one
    head per one-block program (temporal) and forward programs of at most 64 rows (spatial), RoPE off."""
    fn = _packdit(seqs, case, backend)
    providers = [Provider("packdit", fn, fused_rope=True)]
    if case.rope:
        return providers
    if case.mode in ("full", "temporal"):
        other = _other_dq(default_dq)
        providers.append(Provider(f"packdit-{other}-dq", fn, fused_rope=True, dq=other))
    if case.mode == "temporal":
        providers.append(Provider("packdit-one-head", fn, fused_rope=True, one_block_heads=1))
    if case.mode == "spatial":
        providers.append(Provider("packdit-64-row-fwd", fn, fused_rope=True, fwd_rows=64))
    return providers


def packdit_calls() -> list[tuple[str, Callable[[], None]]]:
    """``(label, call)``: each call runs one packdit design of one GPU case on CPU bf16 tensors of the case's
    shapes, forward (no grad, as timed) and forward + backward, with ``backend="triton"``: every Triton launch the
    GPU run makes, for ``precompile.py`` to record (its values are never read)."""
    calls, layouts = [], {}
    for case in _gpu_cases():
        if case.mix not in layouts:
            layouts[case.mix] = PackedSeqs.from_grids(_mix_grids(case.mix), device="cpu")
        seqs = layouts[case.mix]
        default_dq = _default_dq(_schedule(seqs, case), case, torch.bfloat16)
        for provider in _packdit_providers(seqs, case, default_dq, backend="triton"):
            label = f"attention {case.mix} {case.mode} d{case.head_dim} g{case.group} rope={case.rope} {provider.name}"
            calls.append((label, functools.partial(_run_design, provider, seqs, case)))
    return calls


def _run_design(provider: Provider, seqs: PackedSeqs, case: Case) -> None:
    q, k, v, grad = (torch.empty(seqs.num_tokens, heads, case.head_dim, dtype=torch.bfloat16)
                     for heads in (case.heads, case.kv_heads, case.kv_heads, case.heads))
    with _design(provider):
        with torch.no_grad():
            provider.fn(q, k, v)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        torch.autograd.grad(provider.fn(*leaves), leaves, grad)


def _reference(seqs: PackedSeqs, case: Case, fused_rope: bool) -> Callable:
    """The oracle: RoPE (when fused) then ``packdit.reference.varlen_attention`` in the mode."""
    rope = default_rope(case.head_dim) if case.rope and fused_rope else None
    grid = None if case.mode == "full" else seqs.grid

    def fn(q, k, v):
        if rope is not None:
            q, k = reference.apply_rope_3d(q, seqs.positions, rope), reference.apply_rope_3d(k, seqs.positions, rope)
        return reference.varlen_attention(q, k, v, seqs.cu_seqlens, mode=case.mode, grid=grid)

    return fn


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _providers(ctx: Context, seqs: PackedSeqs, case: Case, default_dq: str) -> tuple[list[Provider], dict]:
    """The providers of a case, and name -> reason for those that cannot run it; ``default_dq``: the dQ design
    packdit picks for the case (_default_dq), whose alternative is timed beside it."""
    if case.mix == "interpreter":
        return [Provider("packdit", _packdit(seqs, case), fused_rope=True, timed=False)], {}
    segments = _segments(seqs, case.mode)
    providers, skipped = [], {}
    if ctx.is_gpu:
        providers += _packdit_providers(seqs, case, default_dq)
        for name, attend in (("fa3", _fa3), ("torch-varlen", _torch_varlen), ("flash-attn", _fa2)):
            try:
                attend(*(torch.zeros(1, 1, 64, device=ctx.device, dtype=torch.bfloat16),) * 3,
                       torch.tensor([0, 1], dtype=torch.int32, device=ctx.device), 1)
            except ImportError as e:
                skipped[name] = f"not installed ({e})"
                continue
            except Exception as e:  # noqa: BLE001 -- installed but unusable here: say why
                skipped[name] = f"unusable: {type(e).__name__}: {e}"
                continue
            providers.append(Provider(name, _on_segments(attend, segments)))
        if case.head_dim == 72 and "torch-varlen" not in skipped:
            providers.append(Provider("torch-varlen-d96", _on_segments(_padded_head_dim(_torch_varlen, 96), segments)))
        if (case.mix, case.head_dim) in FLEX_CASES and case.group == 1:
            providers.append(Provider("flex", _flex(seqs, case.mode)))
        else:
            skipped["flex"] = ("compiled for head dim 128 on video-mix without GQA only (one compile per shape and "
                               "mask)")
    else:
        providers.append(Provider("reference", _reference(seqs, case, fused_rope=True), fused_rope=True))
        for name in ("packdit", "fa3", "torch-varlen", "flash-attn", "flex"):
            skipped[name] = "CUDA only (packdit: verified under TRITON_INTERPRET=1 on the interpreter case)"
    if case.mode == "full" and not case.rope:
        providers.append(Provider("sdpa-loop", _on_segments(_sdpa_loop, segments)))
    padded_bytes = (len(segments.cu) - 1) * segments.max_len ** 2 * case.heads * 4
    if padded_bytes < 8 * 2**30:
        providers.append(Provider("sdpa-padded", _on_segments(_sdpa_padded(segments), segments)))
    else:
        skipped["sdpa-padded"] = f"the padded scores need {padded_bytes / 2**30:.0f} GiB"
    return providers, skipped


# ---------------------------------------------------------------------------------------------- measurement
def _pairs(seqs: PackedSeqs, mode: str) -> int:
    return sum({"full": (t * h * w) ** 2, "spatial": t * (h * w) ** 2, "temporal": h * w * t * t}[mode]
               for t, h, w in seqs.grids)


def _time(ctx: Context, fn: Callable, inputs, grad, backward: bool):
    # On a GPU at least 5 calls and 100 ms: the H200 run's 5 medians of 1-4 ms spatial calls spread 5-10%.
    warmup, repeats, min_total_ms = (3, 5, 100.0) if ctx.is_gpu else (0, 2, 0.0)
    if not backward:
        with torch.no_grad():
            return measure(lambda: fn(*inputs), device=ctx.device, warmup=warmup, repeats=repeats,
                           min_total_ms=min_total_ms)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    return measure(lambda: torch.autograd.grad(fn(*leaves), leaves, grad), device=ctx.device, warmup=warmup,
                   repeats=repeats, min_total_ms=min_total_ms)


class _Expected:
    """The reference outputs and gradients of a case: fp32 (the oracle) and in the test dtype (for the
    2x rule), on raw inputs (for providers that fuse RoPE) and on rotated ones (for the others)."""

    def __init__(self, seqs: PackedSeqs, case: Case, inputs, grad):
        q, k, v = inputs
        self.inputs = {True: inputs}
        if case.rope:
            rope = default_rope(case.head_dim)
            q, k = reference.apply_rope_3d(q, seqs.positions, rope), reference.apply_rope_3d(k, seqs.positions, rope)
        self.inputs[False] = (q, k, v)
        self.values = {}
        for fused in (True, False) if case.rope else (True,):
            ref = _reference(seqs, case, fused_rope=fused)
            oracle = _per_head(ref, self.inputs[fused], grad, torch.float32)
            same_precision = None if q.dtype == torch.float32 else _per_head(ref, self.inputs[fused], grad, None)
            self.values[fused] = (oracle, same_precision)
        self.values.setdefault(False, self.values[True])


def _per_head(ref: Callable, inputs, grad, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """``forward_and_grads`` of the reference one key/value head at a time, with the query heads that read it:
    they are independent of the others, and where SDPA has no fused fp32 kernel for a shape it runs its math
    backend, which holds every score of a segment (32 GiB in fp32 for the 9 heads of a 31k-token video ran an H200
    out of memory); one kv head at a time bounds that to its group of heads."""
    q, k, v = inputs
    group = q.shape[1] // k.shape[1]
    per_head = [forward_and_grads(ref, [q[:, h * group:(h + 1) * group], k[:, h:h + 1], v[:, h:h + 1]],
                                  grad[:, h * group:(h + 1) * group], dtype=dtype) for h in range(k.shape[1])]
    return [torch.cat(parts, dim=1) for parts in zip(*per_head)]


def _run_case(ctx: Context, case: Case, seqs: PackedSeqs, label: str) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v, grad = (torch.randn(seqs.num_tokens, heads, case.head_dim, device=ctx.device, dtype=dtype,
                                 generator=gen) for heads in (case.heads, case.kv_heads, case.kv_heads, case.heads))
    expected = _Expected(seqs, case, (q, k, v), grad)
    base = {"device": label, "mix": case.mix, "mode": case.mode, "rope": case.rope, "head_dim": case.head_dim,
            "heads": case.heads, "kv_heads": case.kv_heads, "tokens": seqs.num_tokens, "samples": len(seqs),
            "max_seqlen": seqs.max_seqlen,
            "dtype": str(dtype).removeprefix("torch.")}
    # the scores packdit's tiles compute that attention needs (the rest is padding and block-diagonal masking)
    base["packdit_useful_area"] = round(score_area(seqs.grids, case.mode)["fraction"], 3)
    schedule = _schedule(seqs, case)
    default_dq = _default_dq(schedule, case, dtype)
    providers, skipped = _providers(ctx, seqs, case, default_dq)
    rows = []
    rows += [{**base, "provider": name, "pass": "-", "note": f"skipped: {why}"} for name, why in skipped.items()]
    flops = 4.0 * case.head_dim * case.heads * _pairs(seqs, case.mode)
    for provider in providers:
        row = {**base, "provider": provider.name}
        if provider.name.startswith("packdit"):  # the backward design its fwd+bwd row times
            row["dq"] = default_dq if provider.dq == "default" else provider.dq
            if case.mode == "temporal":
                row["one_block_heads"] = provider.one_block_heads or attention_op._ONE_BLOCK_HEADS
        if ctx.out_of_time():
            rows.append({**row, "pass": "-", "note": "skipped: time budget spent"})
            continue
        with _design(provider):
            spatial_packdit = provider.name.startswith("packdit") and case.mode == "spatial"
            if spatial_packdit:
                row["fwd_rows"] = attention_op._fwd_rows(schedule.block_m, case.head_dim, dtype.itemsize)
            provider_rows = _verify_and_time(ctx, provider, expected, grad, row, flops, case)
            if spatial_packdit and ctx.is_gpu:
                for timed in (r for r in provider_rows if "ms" in r):
                    timed["fwd_rows_tuned"] = _tuned_forward_rows(row["fwd_rows"])
        rows += provider_rows
    return rows


def _tuned_forward_rows(rows: int) -> int | None:
    """Query rows per program of packdit's last forward whose programs could take ``rows``: its autotuner's pick (a
    128-row tile runs as one program or as two of 64 rows, ``attention.fwd_configs``); None if that kernel never
    ran (the dispatcher chose PyTorch)."""
    best = getattr(attention_op._fwd_kernel(rows, deterministic_enabled()), "best_config", None)
    return None if best is None else best.kwargs["BLOCK_M"]


def _verify_and_time(ctx: Context, provider: Provider, expected: _Expected, grad, row: dict, flops: float,
                     case: Case) -> list[dict]:
    """``provider``'s rows: refused or failed, verified only, or timed forward and forward + backward."""
    want, peer = expected.values[provider.fused_rope]
    inputs = expected.inputs[provider.fused_rope]
    try:
        got = forward_and_grads(provider.fn, inputs, grad)
    except Exception as e:  # noqa: BLE001 -- a peer that cannot run this case: record why, go on
        return [{**row, "pass": "-", "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}]
    try:
        err = verify_outputs(f"attention/{case.mix}/{case.mode}/rope={case.rope}/d{case.head_dim}/g{case.group}/"
                             f"{provider.name}",
                             got, want, tol=TOLERANCE[got[0].dtype], peer=peer, names=GRAD_NAMES)
    except OutputMismatch as e:
        return [refused_row({**row, "pass": "-"}, e)]
    if not provider.timed:
        return [{**row, "pass": "-", "rel_err": err, "note": "verified (Triton interpreter), not timed"}]
    rows = []
    for backward in (False, True):
        timing = _time(ctx, provider.fn, inputs, grad, backward)
        useful = flops * (BACKWARD_FACTOR if backward else 1.0)
        rows.append({**row, "pass": "fwd+bwd" if backward else "fwd", "ms": timing.median_ms,
                     "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "TFLOPs": useful / timing.median_ms / 1e9,
                     "rel_err": err, "note": "rope applied outside the timed call"
                     if case.rope and not provider.fused_rope else ""})
    if provider.name.startswith("packdit") or not ctx.is_gpu:  # on a GPU packdit's rows only: ~1 s per profile
        rows[-1].update(_kernel_breakdown(ctx, provider.fn, inputs, grad))
    return rows


def _kernel_breakdown(ctx: Context, fn: Callable, inputs, grad) -> dict:
    """``kernel_ms`` ("name ms; ..."), ``kernel_sum_ms`` of one profiled forward + backward call; the gap to the
    row's ``ms`` is what a lone call spends waiting on the host. A profiler that fails is recorded, not fatal."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    try:
        times = kernel_times(lambda: torch.autograd.grad(fn(*leaves), leaves, grad), device=ctx.device)
    except Exception as e:  # noqa: BLE001 -- a profiler that cannot run here must not lose the timings
        return {"kernel_ms": f"profile failed: {type(e).__name__}: {str(e)[:120]}"}
    return {"kernel_ms": "; ".join(f"{name} {ms:.3g}" for name, ms in times.items()),
            "kernel_sum_ms": sum(times.values())}


def run(ctx: Context) -> list[dict]:
    if ctx.is_gpu:  # flex recompiles per shape and mask: keep them compiled instead of falling back to eager
        import torch._dynamo

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
    label = ctx.env.get("gpu") if ctx.is_gpu else "CPU (no performance claims)"
    layouts, rows = {}, []
    for case in _cases(ctx):
        if ctx.out_of_time():
            rows.append({"device": label, "mix": case.mix, "mode": case.mode, "rope": case.rope,
                         "head_dim": case.head_dim, "heads": case.heads, "kv_heads": case.kv_heads, "provider": "-",
                         "pass": "-", "note": "skipped: time budget spent"})
            continue
        if case.mix not in layouts:
            layouts[case.mix] = _layout(ctx, case.mix)
        rows += _run_case(ctx, case, layouts[case.mix], label)
    _add_peer_ratios(rows)
    _add_rope_overheads(rows)
    rows += useful_areas(label)
    print_table("packdit's tiles: useful / computed query x key scores (host schedule of each mix's GPU layout; "
                "static, not timed)", [r for r in rows if r["pass"] == "static"],
                ["mix", "mode", "tokens", "samples", "packdit_useful_area", "forward_flop_per_byte", "block_m"])
    print_table(f"attention ({label}; TFLOP/s of useful FLOPs)", [r for r in rows if "TFLOPs" in r],
                ["mix", "mode", "rope", "head_dim", "kv_heads", "pass", "provider", "dq", "ms", "TFLOPs",
                 "vs_best_peer", "best_peer", "rope_overhead", "rel_err"])
    for r in rows:
        if r["pass"] == "-" and r.get("note", "").startswith(("skipped: time", "failed", "verified")):
            print(f"  {r['mix']} {r['mode']} rope={r['rope']} d{r['head_dim']} kv_heads={r.get('kv_heads')} "
                  f"{r['provider']}: {r['note']}")
    return rows


def useful_areas(label: str) -> list[dict]:
    """Per workload mix and mode, the fraction of the query x key scores computed by packdit's forward tiles
    that attention needs (:func:`packdit.ops.attention_schedule.score_area`): a property of the schedule,
    the same on any device. In temporal mode a tile packs 64 // T positions of T frames (block-diagonal
    mask), so at most about T / 64 of it is useful."""
    rows = []
    for mix in MIXES:
        grids = _mix_grids(mix)
        for mode in MODES:
            area = score_area(grids, mode)
            tokens = sum(math.prod(g) for g in grids)
            rows.append({"device": label, "mix": mix, "mode": mode, "provider": "packdit", "pass": "static",
                         "tokens": tokens, "samples": len(grids),
                         "packdit_useful_area": round(area["fraction"], 3),
                         "forward_flop_per_byte": round(area["computed"] / (2 * tokens), 1),
                         "block_m": area["block_m"], "note": "schedule property, not timed"})
    return rows


def _case_key(row: dict) -> tuple:
    """The case a timed row belongs to: mix, mode, RoPE, head dim and key/value heads (GQA)."""
    return row["mix"], row["mode"], row["rope"], row["head_dim"], row.get("kv_heads", row.get("heads"))


def _add_peer_ratios(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "TFLOPs" in r:
            groups.setdefault((*_case_key(r), r["pass"]), []).append(r)
    for group in groups.values():
        peers = [r for r in group if not r["provider"].startswith("packdit") and r["provider"] != "reference"]
        best = max(peers, key=lambda r: r["TFLOPs"], default=None)
        for r in group:
            if r["provider"] == "packdit" and best is not None:
                r["vs_best_peer"], r["best_peer"] = r["TFLOPs"] / best["TFLOPs"], best["provider"]


def _add_rope_overheads(rows: list[dict]) -> None:
    """``rope_overhead`` on packdit's timed RoPE-on rows: ms over the RoPE-off row of the same case and pass, - 1
    (RoPE costs packdit its rotation pass; the peers get q and k rotated outside their timed calls)."""
    timed = {(*_case_key(r), r["pass"]): r for r in rows if r.get("provider") == "packdit" and "ms" in r}
    for (mix, mode, rope, head_dim, kv_heads, pass_), r in timed.items():
        off = timed.get((mix, mode, False, head_dim, kv_heads, pass_))
        if rope and off is not None:
            r["rope_overhead"] = r["ms"] / off["ms"] - 1


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "TFLOPs" in r]
    passes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.5 * len(timed) / 4), 7), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], passes):
        subset = [r for r in timed if r["pass"] == pass_]
        groups = list(dict.fromkeys(_case_key(r) for r in subset))
        providers = list(dict.fromkeys(r["provider"] for r in subset))
        width = 0.8 / max(1, len(providers))
        for i, name in enumerate(providers):
            values = {_case_key(r): r["TFLOPs"] for r in subset if r["provider"] == name}
            ax.bar([g + i * width for g in range(len(groups))], [values.get(key, 0.0) for key in groups], width,
                   label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                      [f"{m}\n{mode}{' rope' if rope else ''} d{d} kv{kv}" for m, mode, rope, d, kv in groups],
                      fontsize=6, rotation=90)
        ax.set_ylabel(f"{pass_}: useful TFLOP/s")
        ax.legend(fontsize=6, ncol=4)
    axes[0, 0].set_title(f"packed attention ({rows[0]['device'] if rows else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
