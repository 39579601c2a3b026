"""Section ``norm``: fused LayerNorm + adaLN modulate (``packdit.ops.modulate``), forward + backward.

GPU: bf16, D in {1152, 3072}, N in {16k, 64k} tokens in 1 or 64 segments; packdit's Triton kernels vs
eager PyTorch (``modulated_norm_reference``: layer_norm, gather of the modulation rows, multiply-add)
and ``torch.compile`` of the same function. Reported: time, effective bandwidth of the minimal traffic
(forward reads x, writes y; backward reads x and dy, writes dx: 5 N*D elements) and its % of the HBM peak.
CPU (quick): the eager PyTorch path on tiny shapes only, no performance claims.
"""

from __future__ import annotations

import torch
from common import Context, measure, print_table

from packdit.ops.modulate import modulated_norm
from packdit.reference.modulate import modulated_norm_reference

# HBM peak (GB/s) of the GPUs we report on, from the vendors' data sheets.
HBM_PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100": 3350, "H200": 4800, "A100-SXM4-80GB": 2039, "A100": 1555}


def hbm_peak_gbps(env: dict) -> float | None:
    """Peak HBM bandwidth of the run's GPU (longest matching name), None when unknown or on the CPU."""
    name = env.get("gpu") or ""
    matches = [k for k in HBM_PEAK_GBPS if k in name]
    return HBM_PEAK_GBPS[max(matches, key=len)] if matches else None


def segment_index(num_tokens: int, num_segments: int, device, seed: int = 0) -> torch.Tensor:
    """``(N,)`` int32 segment ids of ``num_segments`` random-length contiguous segments."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(num_tokens - 1, generator=gen)[: num_segments - 1].sort().values + 1
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([num_tokens])]))
    return torch.repeat_interleave(torch.arange(num_segments), lengths).to(device, torch.int32)


def fwd_bwd(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, *args):
    """A closure running ``fn(*inputs, *args)`` forward and backward to all ``inputs``."""
    def step():
        out = fn(*inputs, *args)
        return torch.autograd.grad(out, inputs, grad_out)
    return step


def run(ctx: Context) -> list[dict]:
    if ctx.is_gpu:
        shapes = [(n, d, s) for d in (1152, 3072) for n in (16_384, 65_536) for s in (1, 64)]
        dtype, repeats = torch.bfloat16, 20
    else:
        shapes, dtype, repeats = [(2048, 256, 1), (2048, 256, 64)], torch.float32, 5
    peak = hbm_peak_gbps(ctx.env)
    peers = {"eager": modulated_norm_reference}
    if ctx.is_gpu:
        peers = {"packdit": modulated_norm, **peers, "compile": torch.compile(modulated_norm_reference)}
    rows = []
    for n, d, segments in shapes:
        x = torch.randn(n, d, device=ctx.device, dtype=dtype, requires_grad=True)
        modulation = torch.randn(segments, 2 * d, device=ctx.device, dtype=dtype, requires_grad=True)
        index = segment_index(n, segments, ctx.device)
        grad_out = torch.randn_like(x)
        moved = 5 * n * d * x.element_size()
        for peer, fn in peers.items():
            t = measure(fwd_bwd(lambda x, m, idx: fn(x, *m.chunk(2, dim=1), idx), [x, modulation], grad_out, index),
                        device=ctx.device, repeats=repeats)
            gbps = moved / t.median_ms / 1e6
            rows.append({"impl": peer, "tokens": n, "D": d, "segments": segments, "dtype": str(dtype),
                         "fwd_bwd_ms": t.median_ms, "GBps": gbps, "pct_hbm_peak": 100 * gbps / peak if peak else None})
    device = ctx.env.get("gpu") or "CPU, quick: torch path only, no performance claims"
    print_table(f"norm + modulate fwd+bwd ({device})", rows,
                ["impl", "tokens", "D", "segments", "fwd_bwd_ms", "GBps", "pct_hbm_peak"])
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys((r["tokens"], r["D"], r["segments"]) for r in rows))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        by_case = {(r["tokens"], r["D"], r["segments"]): r["GBps"] for r in rows if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(cases))], [by_case.get(c, 0) for c in cases], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"N={n}\nD={d}\nS={s}" for n, d, s in cases],
                  fontsize=7)
    ax.set_ylabel("GB/s (5 N*D elements)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
