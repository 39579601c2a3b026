"""Section ``layout``: cost of building a packed batch, and the padding that packing removes.

For each mix: pack / unpack throughput (bytes read + written per second) of the PyTorch path,
the layout metadata op ``layout_positions`` with the native extension vs its PyTorch fallback, and
the fraction of compute a pad-to-max batch of the same samples would spend on padding. Before timing,
the packed tokens are checked against ``packdit.reference.patchify_reference``, the unpacked latents
against the inputs, and ``layout_positions`` against its PyTorch fallback (all exact); a mix whose
outputs differ is refused.
"""

from __future__ import annotations

import torch
from common import Context, OutputMismatch, measure, print_table, refused_row, verify_outputs
from workloads import MIXES, take_tokens

import packdit
from packdit import layout_positions as lp
from packdit.reference import patchify_reference

PATCH = (1, 2, 2)


def run(ctx: Context) -> list[dict]:
    budget = 32_768 if ctx.quick else 1_048_576
    repeats = 5 if ctx.quick else 20
    rows = []
    for mix in MIXES:
        if ctx.out_of_time():
            rows.append({"mix": mix, "note": "skipped: time budget spent"})
            continue
        shapes = take_tokens(mix, budget, seed=1)
        latents = [torch.randn(s, device=ctx.device) for s in shapes]
        tokens, seqs = packdit.pack(latents, PATCH)
        n, b = seqs.num_tokens, len(seqs)
        moved = 2 * tokens.numel() * tokens.element_size()
        index = None
        args = (seqs.cu_seqlens, seqs.grid, index, n)
        try:
            verify_outputs(f"layout/{mix}/pack", tokens, patchify_reference(latents, seqs.cu_seqlens, None, PATCH),
                           tol=0.0)
            verify_outputs(f"layout/{mix}/unpack", packdit.unpack(tokens, seqs, PATCH), latents, tol=0.0)
            verify_outputs(f"layout/{mix}/layout_positions", lp.layout_positions(*args),
                           lp._layout_positions_torch(*args), tol=0.0, names=["segment_ids", "positions"])
        except OutputMismatch as e:
            rows.append(refused_row({"mix": mix, "samples": b, "tokens": n}, e))
            continue
        t_pack = measure(lambda: packdit.pack(latents, PATCH), device=ctx.device, repeats=repeats)
        t_unpack = measure(lambda: packdit.unpack(tokens, seqs, PATCH), device=ctx.device, repeats=repeats)
        t_meta_torch = measure(lambda: lp._layout_positions_torch(*args), device=ctx.device, repeats=repeats)
        t_meta = measure(lambda: lp.layout_positions(*args), device=ctx.device, repeats=repeats)
        rows.append({
            "mix": mix, "samples": b, "tokens": n, "max_seqlen": seqs.max_seqlen,
            "pad_to_max_waste": 1.0 - n / (b * seqs.max_seqlen),
            "pack_GBps": moved / t_pack.median_ms / 1e6,
            "unpack_GBps": moved / t_unpack.median_ms / 1e6,
            "pack_ms": t_pack.median_ms, "unpack_ms": t_unpack.median_ms,
            "positions_ms": t_meta.median_ms, "positions_torch_ms": t_meta_torch.median_ms,
            "positions_speedup_vs_torch": t_meta_torch.median_ms / t_meta.median_ms,
            "positions_impl": lp.implementation(seqs.cu_seqlens),
        })
    print_table(
        f"layout ({'CPU, quick: no performance claims' if not ctx.is_gpu else ctx.env.get('gpu')}; outputs verified)",
        [r for r in rows if "pack_ms" in r],
        ["mix", "samples", "tokens", "pad_to_max_waste", "pack_GBps", "unpack_GBps", "positions_ms",
         "positions_torch_ms", "positions_speedup_vs_torch", "positions_impl"],
    )
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "pack_ms" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    mixes = [r["mix"] for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["pack_GBps"] for r in rows], 0.4, label="pack")
    ax1.bar([i + 0.2 for i in x], [r["unpack_GBps"] for r in rows], 0.4, label="unpack")
    ax1.set_xticks(list(x), mixes)
    ax1.set_ylabel("GB/s (read + write)")
    ax1.legend()
    ax2.bar(mixes, [100 * r["pad_to_max_waste"] for r in rows], color="tab:red")
    ax2.set_ylabel("% of pad-to-max tokens that are padding")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
