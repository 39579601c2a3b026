"""Section ``patchify``: packing 64 latents into tokens and back, one CUDA launch vs the per-sample loop.

GPU: each mix's first 64 samples (bf16 latents, patch (1, 2, 2)); ``packdit.pack`` / ``unpack`` with the
CUDA gather/scatter kernel vs the same calls on the PyTorch path (per-sample reshape/permute + cat,
``PACKDIT_DISABLE_EXT=1``). GB/s counts each element read once and written once.
CPU (quick): the PyTorch path only, no performance claims. Before timing, each path's packed tokens are
checked against ``packdit.reference.patchify_reference`` and its unpacked latents against the inputs
(exact); a path that differs is refused.
"""

from __future__ import annotations

import contextlib
import os

import torch
from common import Context, OutputMismatch, measure, print_table, refused_row, verify_outputs
from norm import hbm_peak_gbps
from workloads import MIXES, latent_shapes

import packdit
from packdit.nn import functional as PF
from packdit.reference import patchify_reference

PATCH = (1, 2, 2)
SAMPLES = 64


@contextlib.contextmanager
def torch_path():
    """Run packdit without its native extension (the per-sample PyTorch loop)."""
    previous = os.environ.get("PACKDIT_DISABLE_EXT")
    os.environ["PACKDIT_DISABLE_EXT"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PACKDIT_DISABLE_EXT"]
        else:
            os.environ["PACKDIT_DISABLE_EXT"] = previous


def run(ctx: Context) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    repeats = 20 if ctx.is_gpu else 3
    mixes = MIXES if ctx.is_gpu else MIXES[:1]
    peak = hbm_peak_gbps(ctx.env)
    rows = []
    for mix in mixes:
        if ctx.out_of_time():
            rows.append({"mix": mix, "note": "skipped: time budget spent"})
            continue
        shapes = latent_shapes(mix, SAMPLES, seed=0)
        if not ctx.is_gpu:  # tiny: a 16x16 crop of each latent
            shapes = [(*s[:-2], min(s[-2], 16), min(s[-1], 16)) for s in shapes]
        latents = [torch.randn(s, device=ctx.device, dtype=dtype) for s in shapes]
        tokens, seqs = packdit.pack(latents, PATCH)
        want = patchify_reference(latents, seqs.cu_seqlens, None, PATCH)
        moved = 2 * tokens.numel() * tokens.element_size()
        paths = {"torch-loop": torch_path}
        if PF.use_kernel("patchify", tokens.device, None):
            paths = {"packdit-cuda": contextlib.nullcontext, **paths}
        for impl, path in paths.items():
            base = {"impl": impl, "mix": mix, "samples": len(latents), "tokens": seqs.num_tokens}
            with path():
                try:
                    verify_outputs(f"patchify/{mix}/{impl}/pack", packdit.pack_like(latents, seqs, PATCH), want,
                                   tol=0.0)
                    verify_outputs(f"patchify/{mix}/{impl}/unpack", packdit.unpack(want, seqs, PATCH), latents,
                                   tol=0.0)
                except OutputMismatch as e:
                    rows.append(refused_row(base, e))
                    continue
                t_pack = measure(lambda: packdit.pack_like(latents, seqs, PATCH), device=ctx.device, repeats=repeats)
                t_unpack = measure(lambda: packdit.unpack(tokens, seqs, PATCH), device=ctx.device, repeats=repeats)
            for op, t in (("pack", t_pack), ("unpack", t_unpack)):
                gbps = moved / t.median_ms / 1e6
                rows.append({**base, "op": op, "ms": t.median_ms, "GBps": gbps,
                             "pct_hbm_peak": 100 * gbps / peak if peak else None})
    print_table(f"patchify / unpatchify ({ctx.env.get('gpu') or 'CPU, quick: torch path only, no performance claims'};"
                " outputs verified)", [r for r in rows if "ms" in r],
                ["impl", "op", "mix", "samples", "tokens", "ms", "GBps", "pct_hbm_peak"])
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "ms" in r]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    series = list(dict.fromkeys((r["impl"], r["op"]) for r in rows))
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    width = 0.8 / len(series)
    for i, (impl, op) in enumerate(series):
        by_mix = {r["mix"]: r["GBps"] for r in rows if (r["impl"], r["op"]) == (impl, op)}
        ax.bar([j + i * width for j in range(len(mixes))], [by_mix.get(m, 0) for m in mixes], width,
               label=f"{op} ({impl})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mixes))], mixes)
    ax.set_ylabel("GB/s (read + write)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
