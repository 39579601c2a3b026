"""Shared pieces of the fused-op tests: random packed modulation layouts and the 2x rule on outputs and
all gradients."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from helpers import assert_within_2x, cu_seqlens_of, random_seqlens
from torch import Tensor

MAX_TOKENS = 300
INDEX_MODES = ("segment", "frame", "random")


def random_index(rng: random.Random, mode: str, device="cpu") -> tuple[Tensor, int, list[int]]:
    """``(index (N,) int32, R rows, absent rows)`` of a random packed batch with empty and length-1 segments.

    ``segment``: one row per sample (``segment_ids``); ``frame``: each sample cut into frames of 1-4
    tokens, one row per frame (per-frame timesteps); ``random``: any row for any token. One extra row at
    the end never has tokens.
    """
    lengths = random_seqlens(rng, rng.randint(3, 7), max_len=60)
    lengths[rng.randrange(len(lengths))] = 1
    while sum(lengths) > MAX_TOKENS:
        lengths[lengths.index(max(lengths))] //= 2
    cu = cu_seqlens_of(lengths).tolist()
    if mode == "segment":
        rows = [b for b, n in enumerate(lengths) for _ in range(n)]
        num_rows = len(lengths) + 1
    elif mode == "frame":
        rows, num_rows = [], 0
        for n in lengths:
            frame = rng.randint(1, 4)
            rows += [num_rows + i // frame for i in range(n)]
            num_rows += -(-n // frame)
        num_rows += 1
    else:
        num_rows = rng.randint(2, 12)
        rows = [rng.randrange(num_rows - 1) for _ in range(cu[-1])]
    present = set(rows)
    absent = [r for r in range(num_rows) if r not in present]
    return torch.tensor(rows, dtype=torch.int32, device=device), num_rows, absent


def poisoned_table(num_rows: int, width: int, absent: list[int], *, scale: float = 1.0, device="cpu") -> Tensor:
    """Random (num_rows, width) fp32 modulation rows; rows without tokens are NaN (must never be read)."""
    table = torch.randn(num_rows, width, device=device) * scale
    table[absent] = float("nan")
    return table


def _run(fn: Callable, inputs: dict, diff: list[str], grad_out: Tensor, dtype: torch.dtype | None):
    cast = {k: v if v is None else v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
            for k, v in inputs.items()}
    for k in diff:
        cast[k].requires_grad_()
    out = fn(**cast)
    grads = torch.autograd.grad(out, [cast[k] for k in diff], grad_out.to(out.dtype))
    return out.detach(), dict(zip(diff, grads))


def check_2x(kernel_fn: Callable, reference_fn: Callable, inputs: dict, diff: list[str], *, floor: float = 1e-5,
             dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
    """Kernel (inputs cast to ``dtype``) vs the fp64 oracle on the output and the gradient of every name in
    ``diff``, within 2x the error of the same reference in ``dtype`` (+ floor). NaN anywhere fails."""
    ref_out = reference_fn(**inputs)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed)).to(ref_out.device)
    out, grads = _run(kernel_fn, inputs, diff, grad_out, dtype)
    out_t, grads_t = _run(reference_fn, inputs, diff, grad_out, dtype)
    out_o, grads_o = _run(reference_fn, inputs, diff, grad_out, torch.float64)
    for name, a, b, c in [("out", out, out_t, out_o)] + [(f"d{k}", grads[k], grads_t[k], grads_o[k]) for k in diff]:
        assert not torch.isnan(a).any(), f"{name}: NaN in the kernel result"
        assert_within_2x(a, b, c, floor=floor, name=name)


def grads_of(fn: Callable, inputs: dict, diff: list[str], seed: int = 0) -> list[Tensor]:
    """Output and gradients of ``fn`` (fp32) for a fixed random upstream gradient."""
    out = fn(**inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    out, grads = _run(fn, inputs, diff, grad_out, None)
    return [out, *grads.values()]
