"""packdit.ops.qk_norm_rope (Triton) against the float64 oracle: per-head RMSNorm and 3-D RoPE of q|k heads,
forward and both gradients, on strided / NaN-poisoned views, with the 2x rule (see test_attention.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_within_2x, random_grids

from packdit.layout import PackedSeqs
from packdit.ops.qk_norm_rope import qk_norm_rope
from packdit.reference.rope import RoPE3D, qk_norm_rope_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOOR = 2e-6


def _forward_backward(fn, x, weight, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight)]
    y = fn(*leaves)
    (y * grad.to(y.dtype)).sum().backward()
    return y, *(t.grad if t is not None else None for t in leaves)


def _poisoned_view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled leaf buffer (N + 2, 3 H, D + 8) and the x-valued strided view of its middle heads, like the
    k heads of a fused qkv projection: reads outside the view give NaN."""
    n, h, d = x.shape
    buffer = torch.full((n + 2, 3 * h, d + 8), math.nan, dtype=x.dtype, device=x.device)
    buffer[:n, h:2 * h, :d] = x
    buffer.requires_grad_(True)
    return buffer, buffer[:n, h:2 * h, :d]


def check(seqs: PackedSeqs, heads: int, head_dim: int, *, norm: bool, rope: RoPE3D | None, seed: int = 0,
          eps: float = 1e-6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = seqs.num_tokens
    x = (3 * torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64)).to(DEVICE)
    weight = (1 + 0.5 * torch.randn(heads, head_dim, generator=g, dtype=torch.float64)).to(DEVICE) if norm else None
    grad = torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64).to(DEVICE)

    def oracle(a, w):
        return qk_norm_rope_reference(a, w, seqs.positions, rope, eps)

    want = _forward_backward(oracle, x, weight, grad)
    ref_pt = _forward_backward(oracle, x.to(dtype), None if weight is None else weight.to(dtype), grad)

    buffer, view = _poisoned_view(x.to(dtype))
    w_leaf = weight.to(dtype).requires_grad_(True) if norm else None
    y = qk_norm_rope(view, w_leaf, seqs.positions, rope, eps=eps)
    assert y.is_contiguous() and y.dtype == dtype
    (y * grad.to(dtype)).sum().backward()
    outside = buffer.grad.clone()
    outside[:n, heads:2 * heads, :head_dim] = 0
    assert not outside.any(), "gradient written outside the view"
    got = (y, buffer.grad[:n, heads:2 * heads, :head_dim], w_leaf.grad if norm else None)
    for name, a, b, c in zip(("y", "dx", "dweight"), got, ref_pt, want):
        if c is None:
            continue
        assert not torch.isnan(a).any(), f"{name}: NaN read from poisoned memory"
        assert_within_2x(a, b, c, floor=FLOOR if dtype == torch.float32 else 1e-2, name=name)
    return got


def _layout(seed: int) -> PackedSeqs:
    rng = random.Random(seed)
    grids = random_grids(rng, rng.randint(2, 6), max_t=4, max_hw=6) + [(1, 1, 2)]
    kept = [torch.tensor(sorted(rng.sample(range(t * h * w), (t * h * w) // 2)))
            if t * h * w > 2 and rng.random() < 0.3 else None for t, h, w in grids]
    return PackedSeqs.from_grids(grids, kept=kept, device=DEVICE)


@pytest.mark.parametrize("norm, rope", [
    (True, None),
    (False, RoPE3D(100.0, (4, 6, 6))),
    (True, RoPE3D(10000.0, (4, 6, 6))),
])
@pytest.mark.parametrize("head_dim", [16, 24, 72])
def test_matches_reference(norm, rope, head_dim):
    """Head dims 16 (BLOCK_D = D), 24 and 72 (padded BLOCK_D); rope rotating part or all of the head."""
    if rope is not None and rope.rotated_dims > head_dim:
        rope = RoPE3D(rope.theta, (2, 4, 4))
    check(_layout(head_dim), 5, head_dim, norm=norm, rope=rope, seed=head_dim)


def test_layouts_with_dropped_tokens_use_true_positions():
    for seed in range(3):
        check(_layout(100 + seed), 3, 16, norm=seed % 2 == 0, rope=RoPE3D(500.0, (4, 4, 8)), seed=seed)


def test_expanded_weight_gets_the_summed_gradient():
    """The module passes the (d,) QK-norm weight expanded over heads; autograd sums the per-head gradients."""
    seqs = PackedSeqs.from_grids([(2, 3, 3)], device=DEVICE)
    x = torch.randn(seqs.num_tokens, 4, 8, device=DEVICE)
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    qk_norm_rope(x, weight.expand(4, 8)).square().sum().backward()
    ref = weight.detach().clone().requires_grad_(True)
    (F.rms_norm(x, (8,), eps=1e-6) * ref).square().sum().backward()
    assert_close(weight.grad, ref.grad, atol=1e-4, rtol=1e-4, name="dweight")


def test_errors_name_the_argument():
    seqs = PackedSeqs.from_grids([(1, 2, 2)], device=DEVICE)
    x = torch.randn(4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight: expected shape \(2, 8\)"):
        qk_norm_rope(x, torch.ones(8, device=DEVICE).expand(3, 8))
    with pytest.raises(ValueError, match="positions: expected a .4, 3. int32"):
        qk_norm_rope(x, rope=RoPE3D(axes_dims=(2, 2, 2)))
    with pytest.raises(ValueError, match="rope: axes_dims"):
        qk_norm_rope(x, positions=seqs.positions, rope=RoPE3D(axes_dims=(4, 4, 4)))
    with pytest.raises(ValueError, match="x: expected a 3-D"):
        qk_norm_rope(x[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision(dtype):
    seqs = PackedSeqs.from_grids([(9, 24, 32), (1, 45, 80)], device=DEVICE)
    check(seqs, 16, 72, norm=True, rope=RoPE3D(10000.0, (24, 24, 24)), dtype=dtype)
