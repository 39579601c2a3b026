"""Section ``rope``: the attention layer's QK-norm + 3-D RoPE pass (``packdit.ops.qk_norm_rope``), forward and
backward.

GPU: bf16, the q|k heads (2 H) of a 49,152-token video-mix pack (the attention section's), positions from its
patch grids, ``default_rope`` of the head dim; H x D in {16 x 72 (DiT-XL, STDiT), 24 x 128}, rotation alone
(no QK-norm) and QK-norm then rotation. packdit's kernel computes each token's angles from its positions; the
peers get per-token cos / sin tables (N, D/2, fp32) built outside the timed call, once per batch as a model
shares them across layers: ``eager`` (fp32 math in PyTorch, result in the input dtype) and ``torch.compile`` of
it. Inputs are contiguous ``(N, 2 H, D)``; in a model they are a strided view of the qkv projection, which the
kernel reads row by row at the same traffic. Before anything is timed, every implementation's output and its
gradients (x, and the norm weight) are checked against ``qk_norm_rope_reference`` (angles in fp64) on the
inputs upcast to fp32 (fp64 for fp32 inputs), with the 2x rule against the same reference on the inputs as
they are (``common.verify_outputs``); one that disagrees is refused, not timed.

Reported per pass (forward; backward alone, its forward untimed): time and the bandwidth of the minimal traffic
(forward: x read, y written; backward: dy read, dx written, and x read again for the norm's gradient), % of the
HBM peak. Positions (12 B per token) and the peers' tables (4 D B per token) are left out of the minimum.
CPU (quick): the eager path on a tiny fp32 shape, no performance claims; under ``TRITON_INTERPRET=1`` (the test
suite) packdit's kernel is verified on one tiny case and not timed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from common import Context
from norm import Provider, bandwidth_plot, hbm_peak_gbps, interpreting, kernel_and_torch, report, time_passes, verified
from workloads import patch_grid, take_tokens

from packdit.layout import PackedSeqs
from packdit.models.config import default_rope
from packdit.ops.qk_norm_rope import qk_norm_rope
from packdit.reference.rope import qk_norm_rope_reference, rope_angles
from packdit.rope import RoPE3D

TOKENS = 49_152  # the attention section's pack (attention.TOKEN_BUDGET)
EPS = 1e-6


def _positions(device: torch.device, gpu: bool) -> torch.Tensor:
    """``(N, 3)`` int32 (t, h, w) of the tokens of one video-mix pack of TOKENS patches (GPU), or of three small
    videos and an image (CPU)."""
    grids = ([patch_grid(s) for s in take_tokens("video-mix", TOKENS, seed=0)] if gpu
             else [(2, 3, 4), (1, 5, 6), (3, 2, 2), (1, 1, 1)])
    return PackedSeqs.from_grids(grids, device=device).positions


def _cases(gpu: bool) -> list[tuple[int, int, bool, bool]]:
    """``(H, D, norm, interpreter)``: q|k heads are 2 H; the interpreter case verifies packdit's kernel only. On
    the GPU the two most common first (STDiT's rotation alone; QK-norm + RoPE at D = 128), since each compiles
    its torch.compile peer (forward and backward) and a budget may stop the section early."""
    if gpu:
        return [(16, 72, False, False), (24, 128, True, False), (16, 72, True, False), (24, 128, False, False)]
    return [(2, 24, norm, False) for norm in (False, True)] + ([(2, 24, True, True)] if interpreting() else [])


def _eager(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What a DiT codebase runs: fp32 RMSNorm times ``weight`` (if given), then the rotation of interleaved
    pairs by per-token ``cos`` / ``sin`` tables ``(N, D/2)``; result in x's dtype."""
    z = x.float()
    if weight is not None:
        z = z * torch.rsqrt(z.square().mean(-1, keepdim=True) + EPS) * weight.float()
    even, odd = z[..., 0::2], z[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).to(x.dtype)


def _bound(op: Callable, positions: torch.Tensor, rope: RoPE3D) -> Callable:
    """``fn(x, *weight)`` of ``op`` (qk_norm_rope or its reference, which share a signature): the norm weight when
    given, the rotation by ``positions`` always."""
    def fn(x, *weight):
        return op(x, weight[0] if weight else None, positions, rope, eps=EPS)
    return fn


def _providers(ctx: Context, positions: torch.Tensor, rope: RoPE3D, head_dim: int) -> list[Provider]:
    """``fn(x, *weight)`` of each implementation timed on ``ctx``'s device; the peers' tables are built here."""
    angles = rope_angles(positions, rope, head_dim, dtype=torch.float32)
    cos, sin = angles.cos(), angles.sin()

    def eager(x, *weight):
        return _eager(x, weight[0] if weight else None, cos, sin)

    return kernel_and_torch(ctx, _bound(qk_norm_rope, positions, rope), eager)


def _inputs(device: torch.device, n: int, heads: int, d: int, norm: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    """x (N, heads, D), the norm weight (heads, D) if ``norm``, and the output gradient."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, heads, d, device=device, dtype=dtype, generator=gen)
    weight = [1 + 0.1 * torch.randn(heads, d, device=device, dtype=dtype, generator=gen)] if norm else []
    return [x, *weight, torch.randn(n, heads, d, device=device, dtype=dtype, generator=gen)]


def traffic(heads: int, d: int, itemsize: int, norm: bool, backward: bool) -> int:
    """Minimal HBM bytes per token: x read and y written; backward dy read, dx written (and x read for the
    norm's gradient). The weight and its gradient (heads x D) are negligible per token."""
    tensors = (3 if norm else 2) if backward else 2
    return tensors * heads * d * itemsize


def packdit_calls() -> list[tuple[str, Callable[[], None]]]:
    """``(label, call)``: each call runs packdit's pass forward and backward on CPU bf16 tensors of one GPU case's
    heads and head dim: the Triton launches of the GPU run, for ``precompile.py`` to record."""
    positions = _positions(torch.device("cpu"), gpu=True)
    return [(f"rope H{h} D{d} norm={norm}", functools.partial(_run_packdit, positions, h, d, norm))
            for h, d, norm, _ in _cases(gpu=True)]


def _run_packdit(positions: torch.Tensor, heads: int, d: int, norm: bool) -> None:
    *leaves, grad = _inputs(positions.device, positions.shape[0], 2 * heads, d, norm, torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in leaves]
    torch.autograd.grad(_bound(qk_norm_rope, positions, default_rope(d))(*leaves), leaves, grad)


def run(ctx: Context) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    repeats = 20 if ctx.is_gpu else 3
    peak = hbm_peak_gbps(ctx.env)
    positions = _positions(ctx.device, ctx.is_gpu)
    n = positions.shape[0]
    rows = []
    for h, d, norm, interpreter in _cases(ctx.is_gpu):
        if ctx.out_of_time():
            rows.append({"H": h, "D": d, "norm": norm, "note": "skipped: time budget spent"})
            continue
        rope = default_rope(d)
        heads = 2 * h
        *inputs, grad = _inputs(ctx.device, n, heads, d, norm, dtype)
        base = {"tokens": n, "H": h, "D": d, "qk_heads": heads, "norm": norm,
                "dtype": str(dtype).removeprefix("torch.")}
        providers = ([Provider("packdit", _bound(qk_norm_rope, positions, rope), timed=False)] if interpreter
                     else _providers(ctx, positions, rope, d))
        names = ["y", "dx", "dweight"][:len(inputs) + 1]
        accepted, refused = verified(f"rope/H{h}/D{d}/norm={norm}", providers,
                                     _bound(qk_norm_rope_reference, positions, rope), inputs, grad, (), names, base)
        rows += refused
        for row, provider, err in accepted:
            row["rel_err"] = err
            if not provider.timed:
                rows.append({**row, "note": "verified (Triton interpreter), not timed"})
                continue
            for p, ms in zip(("fwd", "bwd"), time_passes(ctx, provider.fn, inputs, grad, (), repeats)):
                gbps = traffic(heads, d, inputs[0].element_size(), norm, backward=p == "bwd") * n / ms / 1e6
                row.update({f"{p}_ms": ms, f"{p}_GBps": gbps, f"{p}_pct_hbm_peak": 100 * gbps / peak if peak else None})
            rows.append(row)
    report(ctx, "QK-norm + RoPE", rows, ["impl", "tokens", "H", "D", "norm", "fwd_ms", "fwd_GBps", "fwd_pct_hbm_peak",
                                         "bwd_ms", "bwd_GBps", "bwd_pct_hbm_peak", "rel_err"],
           lambda r: f"H={r['H']} D={r['D']} norm={r['norm']}")
    return rows


def plot(rows: list[dict], path) -> None:
    bandwidth_plot(rows, path, lambda r: (r["H"], r["D"], r["norm"]),
                   lambda case: f"H={case[0]} D={case[1]}\n{'norm+rope' if case[2] else 'rope'}", width=10)
