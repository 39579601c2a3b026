"""Section ``mlp``: the DiT MLP with its gated residual, ``x + gate[seg] * fc2(gelu_tanh(fc1(h)))``,
forward + backward.

GPU: bf16, D in {1152, 3072}, hidden 4D, N in {16k, 64k} tokens in 64 segments; packdit's ``fused_mlp``
(persistent TMA GEMMs with bias+GELU / gated-residual epilogues, the GELU gradient fused into the dgrad GEMM,
cuBLAS weight-gradient GEMMs) vs eager PyTorch (``mlp_reference``) and ``torch.compile`` of it. Before timing,
each implementation's output and its gradients of h, both weights and biases, x and gate are checked against
the reference in fp32 with the 2x rule against the reference in bf16 (``common.verify_outputs``); one that
disagrees is refused, not timed. TFLOP/s counts the 6 GEMMs: 12 N*D*H FLOPs; ``vs_compile`` / ``vs_eager``
are packdit's speed-ups (goal: >= 1.0 and >= 1.1).
CPU (quick): the eager path on a tiny fp32 shape, no performance claims; under ``TRITON_INTERPRET=1`` (the
test suite) packdit's kernels are verified on one tiny case and not timed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from common import Context, measure, print_table
from norm import Provider, interpreting, kernel_and_torch, segment_index, verified

from packdit.ops.mlp import fused_mlp
from packdit.reference.mlp import mlp_reference

SEGMENTS = 64
GRAD_NAMES = ["out", "dh", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias", "dx", "dgate"]


def _providers(ctx: Context) -> list[Provider]:
    return kernel_and_torch(ctx, fused_mlp, mlp_reference)


def _cases(gpu: bool) -> list[tuple[int, int, int, bool]]:
    """``(tokens, D, segments, interpreter)``: the interpreter case verifies packdit's kernels only."""
    if gpu:
        return [(n, d, SEGMENTS, False) for d in (1152, 3072) for n in (16_384, 65_536)]
    return [(256, 64, 8, False)] + ([(40, 32, 3, True)] if interpreting() else [])


def packdit_calls() -> list[tuple[str, Callable[[], None]]]:
    """``(label, call)``: each call runs ``fused_mlp`` forward + backward on CPU bf16 tensors of one GPU case's
    shapes, for ``precompile.py`` to record its Triton launches."""
    return [(f"mlp N{n} D{d}", functools.partial(_run_packdit, n, d, segments))
            for n, d, segments, _ in _cases(gpu=True)]


def _run_packdit(n: int, d: int, segments: int) -> None:
    cpu = torch.device("cpu")
    leaves = [x.requires_grad_(True) for x in _inputs(cpu, n, d, segments, torch.bfloat16)]
    torch.autograd.grad(fused_mlp(*leaves, segment_index(n, segments, cpu)), leaves, torch.empty_like(leaves[0]))


def _inputs(device: torch.device, n: int, d: int, segments: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """h, fc1 weight and bias, fc2 weight and bias, x, gate (nn.Linear-like scales)."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = 4 * d

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen) * scale

    return [randn(n, d), randn(hidden, d, scale=d**-0.5), randn(hidden, scale=0.1),
            randn(d, hidden, scale=hidden**-0.5), randn(d, scale=0.1), randn(n, d), randn(segments, d, scale=0.5)]


def run(ctx: Context) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    repeats = 10 if ctx.is_gpu else 3
    rows = []
    for n, d, segments, interpreter in _cases(ctx.is_gpu):
        inputs = _inputs(ctx.device, n, d, segments, dtype)
        index = segment_index(n, segments, ctx.device)
        grad = torch.randn(n, d, device=ctx.device, dtype=dtype)
        base = {"tokens": n, "D": d, "hidden": 4 * d, "segments": segments, "dtype": str(dtype).removeprefix("torch.")}
        providers = [Provider("packdit", fused_mlp, timed=False)] if interpreter else _providers(ctx)
        accepted, refused = verified(f"mlp/N{n}/D{d}", providers, mlp_reference, inputs, grad, (index,), GRAD_NAMES,
                                     base)
        rows += refused
        flops = 12 * n * d * 4 * d
        timed = []
        for row, provider, err in accepted:
            row["rel_err"] = err
            if not provider.timed:
                rows.append({**row, "note": "verified (Triton interpreter), not timed"})
                continue
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            t = measure(lambda fn=provider.fn: torch.autograd.grad(fn(*leaves, index), leaves, grad),
                        device=ctx.device, repeats=repeats)
            row.update({"fwd_bwd_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                        "TFLOPs": flops / t.median_ms / 1e9})
            timed.append(row)
        by_impl = {r["impl"]: r for r in timed}
        if "packdit" in by_impl:
            for peer in ("compile", "eager"):
                if peer in by_impl:
                    by_impl["packdit"][f"vs_{peer}"] = by_impl[peer]["fwd_bwd_ms"] / by_impl["packdit"]["fwd_bwd_ms"]
        rows += timed
        del inputs
    device = ctx.env.get("gpu") or "CPU, quick: torch path only, no performance claims"
    print_table(f"gated MLP fwd+bwd ({device})", [r for r in rows if "fwd_bwd_ms" in r],
                ["impl", "tokens", "D", "hidden", "fwd_bwd_ms", "TFLOPs", "vs_compile", "vs_eager", "rel_err"])
    for r in rows:
        if "note" in r:
            print(f"  N={r['tokens']} D={r['D']} {r['impl']}: {r['note']}")
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "TFLOPs" in r]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    cases = list(dict.fromkeys((r["tokens"], r["D"]) for r in timed))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        by_case = {(r["tokens"], r["D"]): r["TFLOPs"] for r in timed if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(cases))], [by_case.get(c, 0) for c in cases], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"N={n}\nD={d}" for n, d in cases], fontsize=8)
    ax.set_ylabel("TFLOP/s (12 N*D*H)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
