"""Section ``norm``: fused LayerNorm + adaLN modulate (``packdit.ops.modulate``), forward and backward.

GPU: bf16, D in {1152, 3072}, N in {16k, 64k} tokens in 1 or 64 segments; packdit's Triton kernels vs eager
PyTorch (``modulated_norm_reference``: layer_norm, gather of the modulation rows, multiply-add) and
``torch.compile`` of the same function. Before anything is timed, every implementation's output and all its
gradients (x, and shift and scale as one adaLN output) are checked against the reference in fp32 with the 2x
rule against the same reference in the precision under test (``common.verify_outputs``); one that disagrees
is refused, not timed.

Reported per pass (forward; backward alone, its forward untimed): time, the effective bandwidth of the
minimal traffic and its % of the HBM peak. The minimum (``packdit.ops.modulate.modulated_norm_traffic``)
reads x (and dy) once, writes y (dx) once and touches each modulation row once; ``moved_B_per_token`` is what
packdit's kernels move by the same estimate (index, saved mean/rstd, the backward's segment schedule and
partial sums), so ``moved / min`` bounds the bandwidth packdit can show.
CPU (quick): the eager path on tiny fp32 shapes, no performance claims; under ``TRITON_INTERPRET=1`` (the
test suite) packdit's kernels are verified on one tiny case and not timed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import torch
from common import Context, OutputMismatch, forward_and_grads, measure, print_table, refused_row, verify_outputs

from packdit.ops.modulate import modulated_norm, modulated_norm_traffic
from packdit.reference.modulate import modulated_norm_reference

# HBM peak (GB/s) of the GPUs we report on, from the vendors' data sheets.
HBM_PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100": 3350, "H200": 4800, "A100-SXM4-80GB": 2039, "A100": 1555}
# verify_outputs tolerance on top of 2x the same-precision reference's error
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
GRAD_NAMES = ["y", "dx", "dmodulation"]  # modulation = [shift | scale], one adaLN output


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable
    timed: bool = True


def kernel_and_torch(ctx: Context, kernel: Callable, reference: Callable) -> list[Provider]:
    """The implementations timed on ``ctx``'s device: on a GPU packdit's ``kernel``, the eager PyTorch
    ``reference`` and ``torch.compile`` of it; elsewhere the eager reference alone."""
    if ctx.is_gpu:
        return [Provider("packdit", kernel), Provider("eager", reference),
                Provider("compile", torch.compile(reference))]
    return [Provider("eager", reference)]


def hbm_peak_gbps(env: dict) -> float | None:
    """Peak HBM bandwidth of the run's GPU (longest matching name), None when unknown or on the CPU."""
    name = env.get("gpu") or ""
    matches = [k for k in HBM_PEAK_GBPS if k in name]
    return HBM_PEAK_GBPS[max(matches, key=len)] if matches else None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def segment_index(num_tokens: int, num_segments: int, device, seed: int = 0) -> torch.Tensor:
    """``(N,)`` int32 segment ids of ``num_segments`` random-length contiguous segments."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(num_tokens - 1, generator=gen)[: num_segments - 1].sort().values + 1
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([num_tokens])]))
    return torch.repeat_interleave(torch.arange(num_segments), lengths).to(device, torch.int32)


def verified(label: str, providers: list[Provider], reference: Callable, inputs: list[torch.Tensor],
             grad: torch.Tensor, args: tuple, names: list[str], base: dict) -> tuple[list, list[dict]]:
    """``(accepted, refused rows)``: ``accepted`` holds ``(row, provider, relative error)`` of the providers
    whose output and every input gradient match ``reference`` run in fp64 (fp32 inputs) or fp32, within 2x the
    error of ``reference`` in the inputs' precision (``common.verify_outputs``); the others get a refused row
    and must not be timed."""
    dtype = inputs[0].dtype
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = forward_and_grads(reference, inputs, grad, *args, dtype=oracle_dtype)
    peer = forward_and_grads(reference, inputs, grad, *args)
    accepted, refused = [], []
    for provider in providers:
        row = {**base, "impl": provider.name}
        try:
            got = forward_and_grads(provider.fn, inputs, grad, *args)
            err = verify_outputs(f"{label}/{provider.name}", got, want, tol=TOLERANCE[dtype], peer=peer, names=names)
        except OutputMismatch as e:
            refused.append(refused_row(row, e))
            continue
        accepted.append((row, provider, err))
    return accepted, refused


def time_passes(ctx: Context, fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor, args: tuple,
                repeats: int) -> tuple[float, float]:
    """Median ms of the forward (no autograd graph) and of the backward alone (each on a fresh graph, whose
    forward is not timed)."""
    with torch.no_grad():
        forward = measure(lambda: fn(*inputs, *args), device=ctx.device, repeats=repeats)
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    backward = measure(lambda out: torch.autograd.grad(out, leaves, grad), device=ctx.device, repeats=repeats,
                       setup=lambda: fn(*leaves, *args))
    return forward.median_ms, backward.median_ms


def _packdit(x, modulation, index):
    return modulated_norm(x, *modulation.chunk(2, dim=1), index)


def _reference(x, modulation, index):
    return modulated_norm_reference(x, *modulation.chunk(2, dim=1), index)


def _providers(ctx: Context) -> list[Provider]:
    """The implementations timed on ``ctx``'s device (shift and scale are chunks of one adaLN output)."""
    return kernel_and_torch(ctx, _packdit, _reference)


def _cases(gpu: bool) -> list[tuple[int, int, int, bool]]:
    """``(tokens, D, segments, interpreter)``: the interpreter case verifies packdit's kernels only."""
    if gpu:
        return [(n, d, s, False) for d in (1152, 3072) for n in (16_384, 65_536) for s in (1, 64)]
    return [(512, 64, 1, False), (512, 64, 8, False)] + ([(40, 48, 3, True)] if interpreting() else [])


def _inputs(device: torch.device, n: int, d: int, segments: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """x, modulation (one adaLN output: shift | scale), segment index, output gradient."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype, generator=gen) * 2 + 0.5
    modulation = torch.randn(segments, 2 * d, device=device, dtype=dtype, generator=gen) * 0.5
    index = segment_index(n, segments, device)
    return [x, modulation, index, torch.randn(n, d, device=device, dtype=dtype, generator=gen)]


def packdit_calls() -> list[tuple[str, Callable[[], None]]]:
    """``(label, call)``: each call runs packdit's norm + modulate forward and backward on CPU bf16 tensors of one
    GPU case's shapes: the Triton launches of the GPU run, for ``precompile.py`` to record."""
    return [(f"norm N{n} D{d} S{segments}", functools.partial(_run_packdit, n, d, segments))
            for n, d, segments, _ in _cases(gpu=True)]


def _run_packdit(n: int, d: int, segments: int) -> None:
    x, modulation, index, grad = _inputs(torch.device("cpu"), n, d, segments, torch.bfloat16)
    leaves = [x.requires_grad_(True), modulation.requires_grad_(True)]
    torch.autograd.grad(_packdit(*leaves, index), leaves, grad)


def run(ctx: Context) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_gpu else torch.float32
    repeats = 20 if ctx.is_gpu else 3
    peak = hbm_peak_gbps(ctx.env)
    rows = []
    for n, d, segments, interpreter in _cases(ctx.is_gpu):
        x, modulation, index, grad = _inputs(ctx.device, n, d, segments, dtype)
        base = {"tokens": n, "D": d, "segments": segments, "dtype": str(dtype).removeprefix("torch.")}
        providers = [Provider("packdit", _packdit, timed=False)] if interpreter else _providers(ctx)
        accepted, refused = verified(f"norm/N{n}/D{d}/S{segments}", providers, _reference, [x, modulation], grad,
                                     (index,), GRAD_NAMES, base)
        rows += refused
        traffic = {p: modulated_norm_traffic(n, d, segments, itemsize=x.element_size(), backward=p == "bwd")
                   for p in ("fwd", "bwd")}
        for row, provider, err in accepted:
            row["rel_err"] = err
            if not provider.timed:
                rows.append({**row, "note": "verified (Triton interpreter), not timed"})
                continue
            times = time_passes(ctx, provider.fn, [x, modulation], grad, (index,), repeats)
            for p, ms in zip(("fwd", "bwd"), times):
                gbps = traffic[p]["minimum"] * n / ms / 1e6
                row.update({f"{p}_ms": ms, f"{p}_GBps": gbps, f"{p}_pct_hbm_peak": 100 * gbps / peak if peak else None,
                            f"{p}_min_B_per_token": traffic[p]["minimum"]})
                if provider.name == "packdit":
                    row[f"{p}_moved_B_per_token"] = traffic[p]["moved"]
            rows.append(row)
    report(ctx, "norm + modulate", rows,
           ["impl", "tokens", "D", "segments", "fwd_ms", "fwd_GBps", "fwd_pct_hbm_peak", "bwd_ms", "bwd_GBps",
            "bwd_pct_hbm_peak", "fwd_moved_B_per_token", "bwd_moved_B_per_token", "bwd_min_B_per_token", "rel_err"],
           lambda r: f"N={r['tokens']} D={r['D']} S={r['segments']}")
    return rows


def report(ctx: Context, title: str, rows: list[dict], columns: list[str], case_label: Callable[[dict], str]) -> None:
    """The timed rows as a table of bandwidths, then the other rows' notes (verified only, skipped)."""
    device = ctx.env.get("gpu") or "CPU, quick: torch path only, no performance claims"
    print_table(f"{title} ({device}; GB/s of the minimal traffic)", [r for r in rows if "fwd_ms" in r], columns)
    for r in rows:
        if "note" in r:
            print(f"  {' '.join([case_label(r), *([r['impl']] if 'impl' in r else [])])}: {r['note']}")


def plot(rows: list[dict], path) -> None:
    bandwidth_plot(rows, path, lambda r: (r["tokens"], r["D"], r["segments"]),
                   lambda case: "N={}\nD={}\nS={}".format(*case), width=12)


def bandwidth_plot(rows: list[dict], path, case_of: Callable[[dict], tuple], label_of: Callable[[tuple], str],
                   width: float) -> None:
    """Bars of fwd and bwd GB/s of the minimal traffic per implementation and case (``case_of(row)``, labelled
    ``label_of(case)``), for the sections that report bandwidth."""
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "fwd_GBps" in r]
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.5), sharey=True)
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    cases = list(dict.fromkeys(case_of(r) for r in timed))
    bar = 0.8 / max(len(impls), 1)
    for ax, p in zip(axes, ("fwd", "bwd")):
        for i, impl in enumerate(impls):
            by_case = {case_of(r): r[f"{p}_GBps"] for r in timed if r["impl"] == impl}
            ax.bar([j + i * bar for j in range(len(cases))], [by_case.get(c, 0) for c in cases], bar, label=impl)
        ax.set_xticks([j + 0.4 - bar / 2 for j in range(len(cases))], [label_of(c) for c in cases], fontsize=7)
        ax.set_title(f"{p}: GB/s of the minimal traffic")
    if impls:
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
