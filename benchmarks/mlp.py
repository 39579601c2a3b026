"""Section ``mlp``: the DiT MLP with its gated residual, ``x + gate[seg] * fc2(gelu_tanh(fc1(h)))``,
forward + backward.

GPU: bf16, D in {1152, 3072}, hidden 4D, N in {16k, 64k} tokens in 64 segments; packdit's ``fused_mlp``
(Triton GEMMs with bias+GELU / gated-residual epilogues, cuBLAS backward GEMMs) vs eager PyTorch
(``mlp_reference``) and ``torch.compile`` of it. TFLOP/s counts the 6 GEMMs: 12 N*D*H FLOPs.
CPU (quick): the eager PyTorch path on tiny shapes only, no performance claims.
"""

from __future__ import annotations

import torch
from common import Context, measure, print_table
from norm import fwd_bwd, segment_index

from packdit.ops.mlp import fused_mlp
from packdit.reference.mlp import mlp_reference

SEGMENTS = 64


def run(ctx: Context) -> list[dict]:
    if ctx.is_gpu:
        shapes = [(n, d) for d in (1152, 3072) for n in (16_384, 65_536)]
        dtype, repeats = torch.bfloat16, 10
        peers = {"packdit": fused_mlp, "eager": mlp_reference, "compile": torch.compile(mlp_reference)}
    else:
        shapes, dtype, repeats = [(512, 128)], torch.float32, 5
        peers = {"eager": mlp_reference}
    rows = []
    for n, d in shapes:
        hidden = 4 * d

        def param(*shape, scale=1.0):
            return (torch.randn(*shape, device=ctx.device, dtype=dtype) * scale).requires_grad_()

        inputs = [param(n, d), param(hidden, d, scale=d**-0.5), param(hidden), param(d, hidden, scale=hidden**-0.5),
                  param(d), param(n, d), param(SEGMENTS, d)]
        index = segment_index(n, SEGMENTS, ctx.device)
        grad_out = torch.randn(n, d, device=ctx.device, dtype=dtype)
        flops = 12 * n * d * hidden
        for peer, fn in peers.items():
            t = measure(fwd_bwd(fn, inputs, grad_out, index), device=ctx.device, repeats=repeats)
            rows.append({"impl": peer, "tokens": n, "D": d, "hidden": hidden, "segments": SEGMENTS, "dtype": str(dtype),
                         "fwd_bwd_ms": t.median_ms, "TFLOPs": flops / t.median_ms / 1e9})
        del inputs
    print_table(f"gated MLP fwd+bwd ({ctx.env.get('gpu') or 'CPU, quick: torch path only, no performance claims'})",
                rows, ["impl", "tokens", "D", "hidden", "fwd_bwd_ms", "TFLOPs"])
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys((r["tokens"], r["D"]) for r in rows))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        by_case = {(r["tokens"], r["D"]): r["TFLOPs"] for r in rows if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(cases))], [by_case.get(c, 0) for c in cases], width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"N={n}\nD={d}" for n, d in cases], fontsize=8)
    ax.set_ylabel("TFLOP/s (12 N*D*H)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
