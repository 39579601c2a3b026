"""Section ``attention``: packed varlen attention, packdit's Triton kernel vs the PyTorch / flash-attn peers.

Providers (same q, k, v, outputs checked equal before timing):
    packdit        packdit.varlen_attention (Triton)
    torch-varlen   torch.nn.attention.varlen.varlen_attn (flash varlen inside PyTorch; CUDA only)
    flex           FlexAttention with a document mask (block mask built once, flex_attention compiled)
    sdpa-loop      one F.scaled_dot_product_attention call per sample
    sdpa-padded    pad to (B, H, L_max, D), SDPA with a key-padding mask, unpad (copies included)
    flash-attn     flash_attn.flash_attn_varlen_func, when the package is installed

Useful FLOPs: ``4 * sum_b L_b^2 * D * H`` forward, x3.5 forward+backward (backward = 2.5x forward).
For each (mix, head dim, pass) ``vs_best_peer`` is packdit's TFLOP/s over the strongest peer's. The
mode rows time spatial / temporal attention against full attention on the same batch next to their
block-sparse FLOP ratio ``sum (frames * (HW)^2) / sum L^2`` (spatial), ``sum (HW * T^2) / sum L^2``
(temporal).

GPU: bf16, model width 1152 (heads = 1152 / head dim, as DiT-XL), mixes images / video-mix /
long-videos from ``workloads.take_tokens`` with a 49k-token budget (16k with --quick; a long video
alone can exceed it), 5 timed calls per point, flex at head dim 64 only: about 3 minutes on an H100
(estimated, not yet measured). CPU (quick): the Triton kernel cannot run outside the
interpreter, so only the reference and the torch peers run on tiny fp32 layouts -- a smoke test of
the section, not a performance claim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from common import Context, measure, print_table
from workloads import take_tokens

import packdit
from packdit import reference
from packdit.layout import PackedSeqs

MODEL_WIDTH = 1152
GPU_MIXES = ("images", "video-mix", "long-videos")
GPU_HEAD_DIMS = (64, 72, 128)
# Tiny layouts for the CPU smoke run: images (144..576 tokens) and small videos.
CPU_LAYOUTS = {"cpu-images": [(1, 9, 16), (1, 12, 20), (1, 6, 8)],
               "cpu-videos": [(3, 6, 8), (2, 6, 8), (1, 8, 8)]}
BACKWARD_FACTOR = 3.5
FLEX_HEAD_DIM = 64


# ---------------------------------------------------------------------------------------------- providers
def _packdit(q, k, v, seqs, mode="full"):
    return packdit.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode=mode, seqs=seqs)


def _reference(q, k, v, seqs):
    return reference.varlen_attention(q, k, v, seqs.cu_seqlens)


def _sdpa_loop(q, k, v, seqs):
    cu = seqs.cached("bench_cu_host", lambda: seqs.cu_seqlens.tolist())
    outs = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1))
            for a, b in zip(cu, cu[1:]) if b > a]
    return torch.cat([o.transpose(0, 1) for o in outs])


def _sdpa_padded_fn(seqs):
    """SDPA on a padded (B, H, L_max, D) batch with a key-padding mask; the pad / unpad copies are timed."""
    sample = seqs.segment_ids.long()
    row = torch.arange(seqs.num_tokens, device=sample.device) - seqs.cu_seqlens.long()[sample]
    num, length = len(seqs), seqs.max_seqlen
    key_valid = (torch.arange(length, device=sample.device)[None, :] < seqs.lengths[:, None])[:, None, None, :]

    def pad(x):
        padded = x.new_zeros(num, length, *x.shape[1:])
        padded[sample, row] = x
        return padded.transpose(1, 2)

    def fn(q, k, v, _seqs):
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_valid)
        return out.transpose(1, 2)[sample, row]

    return fn


def _flex_fn(seqs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = seqs.segment_ids

    def same_sample(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    n = seqs.num_tokens
    block_mask = create_block_mask(same_sample, None, None, n, n, device=doc.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v, _seqs):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask)
        return out[0].transpose(0, 1)

    return fn


def _torch_varlen_fn():
    from torch.nn.attention.varlen import varlen_attn

    def fn(q, k, v, seqs):
        return varlen_attn(q, k, v, seqs.cu_seqlens, seqs.cu_seqlens, seqs.max_seqlen, seqs.max_seqlen)

    return fn


def _flash_attn_fn():
    from flash_attn import flash_attn_varlen_func

    def fn(q, k, v, seqs):
        return flash_attn_varlen_func(q, k, v, seqs.cu_seqlens, seqs.cu_seqlens, seqs.max_seqlen, seqs.max_seqlen)

    return fn


def _providers(ctx: Context, seqs: PackedSeqs, head_dim: int) -> tuple[dict, dict]:
    """name -> fn(q, k, v, seqs), and name -> reason for the providers that cannot run here."""
    fns, skipped = {}, {}
    if ctx.is_gpu:
        fns["packdit"] = _packdit
        for name, make in (("torch-varlen", _torch_varlen_fn), ("flash-attn", _flash_attn_fn)):
            try:
                fns[name] = make()
            except ImportError as e:
                skipped[name] = f"not importable: {e}"
        if head_dim != FLEX_HEAD_DIM:
            skipped["flex"] = f"timed at head dim {FLEX_HEAD_DIM} only (one flex compile per shape, ~30 s each)"
        else:
            fns["flex"] = _flex_fn(seqs)
    else:
        fns["reference"] = _reference
        for name in ("packdit", "torch-varlen", "flash-attn"):
            skipped[name] = "CUDA only"
        skipped["flex"] = "compiling flex_attention for the CPU exceeds the quick run's time"
    fns["sdpa-loop"] = _sdpa_loop
    padded_bytes = len(seqs) * seqs.max_seqlen * (MODEL_WIDTH // head_dim) * head_dim * 2 * 4
    if padded_bytes < 8 * 2**30:
        fns["sdpa-padded"] = _sdpa_padded_fn(seqs)
    else:
        skipped["sdpa-padded"] = f"padded batch needs {padded_bytes / 2**30:.0f} GiB"
    return fns, skipped


# ---------------------------------------------------------------------------------------------- measurement
def _flops(seqs: PackedSeqs, heads: int, head_dim: int, mode: str = "full") -> float:
    pairs = 0
    for (t, h, w), length in zip(seqs.grids, seqs.seqlens):
        pairs += {"full": length * length, "spatial": t * (h * w) ** 2, "temporal": h * w * t * t}[mode]
    return 4.0 * pairs * head_dim * heads


def _inputs(seqs: PackedSeqs, heads: int, head_dim: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(seqs.num_tokens, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(4)]


def _time(fn, q, k, v, grad, seqs, ctx, backward: bool, repeats: int):
    warmup = 3 if ctx.is_gpu else 1
    if not backward:
        with torch.no_grad():
            return measure(lambda: fn(q, k, v, seqs), device=ctx.device, warmup=warmup, repeats=repeats)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def step():
        fn(*leaves, seqs).backward(grad)

    return measure(step, device=ctx.device, warmup=warmup, repeats=repeats)


def _layouts(ctx: Context):
    if not ctx.is_gpu:
        return {name: PackedSeqs.from_grids(grids, device=ctx.device) for name, grids in CPU_LAYOUTS.items()}
    budget = 16_384 if ctx.quick else 49_152
    layouts = {}
    for mix in GPU_MIXES:
        shapes = take_tokens(mix, budget, seed=0)
        grids = [(s[1] if len(s) == 4 else 1, s[-2] // 2, s[-1] // 2) for s in shapes]
        layouts[mix] = PackedSeqs.from_grids(grids, device=ctx.device)
    return layouts


def run(ctx: Context) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    head_dims = GPU_HEAD_DIMS if ctx.is_gpu else (64,)
    repeats = 5 if ctx.is_gpu else 3
    label = ctx.env.get("gpu", "CPU (no performance claims)") if ctx.is_gpu else "CPU (no performance claims)"
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    rows = []
    for mix, seqs in _layouts(ctx).items():
        for head_dim in head_dims:
            heads = MODEL_WIDTH // head_dim if ctx.is_gpu else 4
            q, k, v, grad = _inputs(seqs, heads, head_dim, dtype, ctx.device)
            fns, skipped = _providers(ctx, seqs, head_dim)
            want = reference.varlen_attention(q.float(), k.float(), v.float(), seqs.cu_seqlens)
            base = {"device": label, "mix": mix, "tokens": seqs.num_tokens, "samples": len(seqs),
                    "max_seqlen": seqs.max_seqlen, "head_dim": head_dim, "heads": heads, "dtype": str(dtype)[6:]}
            for name, reason in skipped.items():
                rows.append({**base, "provider": name, "pass": "-", "note": f"skipped: {reason}"})
            for name, fn in fns.items():
                with torch.no_grad():
                    err = (fn(q, k, v, seqs).float() - want).abs().max().item()
                if err > tol:
                    raise AssertionError(f"attention/{mix}/{name}/d{head_dim}: output differs from the reference "
                                         f"by {err:.3g} > {tol}")
                for backward in (False, True):
                    timing = _time(fn, q, k, v, grad, seqs, ctx, backward, repeats)
                    flops = _flops(seqs, heads, head_dim) * (BACKWARD_FACTOR if backward else 1.0)
                    rows.append({**base, "provider": name, "pass": "fwd+bwd" if backward else "fwd",
                                 "ms": timing.median_ms, "TFLOPs": flops / timing.median_ms / 1e9,
                                 "max_abs_err": err, "note": ""})
    _add_peer_ratios(rows)
    if ctx.is_gpu:
        rows += _mode_rows(ctx, _layouts(ctx)["video-mix"], dtype, repeats, label)
    print_table(f"attention ({label})", [r for r in rows if r["pass"] != "-"],
                ["mix", "head_dim", "pass", "provider", "ms", "TFLOPs", "vs_best_peer", "mode", "time_vs_full",
                 "flops_vs_full"])
    for r in rows:
        if r["pass"] == "-":
            print(f"  {r['mix']} d{r['head_dim']} {r['provider']}: {r['note']}")
    return rows


def _add_peer_ratios(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "TFLOPs" in r:
            groups.setdefault((r["mix"], r["head_dim"], r["pass"]), []).append(r)
    for group in groups.values():
        peers = [r["TFLOPs"] for r in group if r["provider"] != "packdit"]
        best = max(peers, default=math.nan)
        for r in group:
            r["vs_best_peer"] = r["TFLOPs"] / best if r["provider"] == "packdit" and peers else math.nan


def _mode_rows(ctx: Context, seqs: PackedSeqs, dtype, repeats: int, label: str) -> list[dict]:
    """Spatial / temporal vs full attention on one video batch: time ratio next to the FLOP ratio."""
    head_dim, heads = 64, MODEL_WIDTH // 64
    q, k, v, grad = _inputs(seqs, heads, head_dim, dtype, ctx.device)
    rows, full_ms = [], {}
    for mode in ("full", "spatial", "temporal"):
        def fn(a, b, c, s, mode=mode):
            return _packdit(a, b, c, s, mode)
        for backward in (False, True):
            timing = _time(fn, q, k, v, grad, seqs, ctx, backward, repeats)
            pass_ = "fwd+bwd" if backward else "fwd"
            full_ms.setdefault(pass_, timing.median_ms)
            flops = _flops(seqs, heads, head_dim, mode) * (BACKWARD_FACTOR if backward else 1.0)
            rows.append({"device": label, "mix": "video-mix", "tokens": seqs.num_tokens, "head_dim": head_dim,
                         "heads": heads, "dtype": str(dtype)[6:], "provider": f"packdit-{mode}", "mode": mode,
                         "pass": pass_, "ms": timing.median_ms, "TFLOPs": flops / timing.median_ms / 1e9,
                         "time_vs_full": timing.median_ms / full_ms[pass_],
                         "flops_vs_full": _flops(seqs, heads, head_dim, mode) / _flops(seqs, heads, head_dim),
                         "note": ""})
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "TFLOPs" in r and "mode" not in r]
    groups = list(dict.fromkeys((r["mix"], r["head_dim"], r["pass"]) for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / max(1, len(providers))
    for i, name in enumerate(providers):
        values = {(r["mix"], r["head_dim"], r["pass"]): r["TFLOPs"] for r in timed if r["provider"] == name}
        ax.bar([g + i * width for g in range(len(groups))], [values.get(key, 0.0) for key in groups], width,
               label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                  [f"{m}\nd{d} {p}" for m, d, p in groups], fontsize=7)
    ax.set_ylabel("useful TFLOP/s")
    ax.set_title(f"packed attention ({rows[0]['device'] if rows else ''})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
