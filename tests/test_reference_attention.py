"""packdit.reference.varlen_attention against a dense block-diagonal-masked attention in float64."""

import math
import random

import pytest
import torch
from helpers import assert_close, cu_seqlens_of, random_seqlens

from packdit.reference import varlen_attention


def _dense_masked(q, k, v, seqlens_q, seqlens_k, scale):
    """softmax(scale q k^T + mask) v over the whole packed sequence, mask = same-sample blocks."""
    seg_q = torch.repeat_interleave(torch.arange(len(seqlens_q)), torch.tensor(seqlens_q))
    seg_k = torch.repeat_interleave(torch.arange(len(seqlens_k)), torch.tensor(seqlens_k))
    allowed = seg_q[:, None] == seg_k[None, :]
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no keys -> zero output
    return torch.einsum("hqk,khd->qhd", p, vv), lse


@pytest.mark.parametrize("hq, hk, d", [(4, 4, 32), (8, 2, 72), (6, 1, 16)])
@pytest.mark.parametrize("cross", [False, True])
def test_matches_dense_masked_attention(hq, hk, d, cross):
    rng = random.Random(hq * 100 + d + cross)
    seqlens_q = random_seqlens(rng, 6, max_len=50)
    seqlens_k = random_seqlens(rng, 6, max_len=30) if cross else seqlens_q
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(seqlens_q), hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(sum(seqlens_k), hk, d, dtype=torch.float64, generator=g)
    v = torch.randn(sum(seqlens_k), hk, d, dtype=torch.float64, generator=g)
    scale = 0.3
    out, lse = varlen_attention(q, k, v, cu_seqlens_of(seqlens_q), cu_seqlens_of(seqlens_k) if cross else None,
                                scale=scale, return_lse=True)
    want, want_lse = _dense_masked(q, k, v, seqlens_q, seqlens_k, scale)
    assert_close(out, want, atol=1e-10, rtol=1e-10, name="out")
    assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5, name="lse")


def test_no_cross_sample_leak_and_gradients():
    seqlens = [5, 0, 1, 9]
    cu = cu_seqlens_of(seqlens)
    q, k, v = (torch.randn(sum(seqlens), 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = varlen_attention(q, k, v, cu)
    # perturb sample 3's keys/values: samples 0 and 2 must not change
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[6:], v2[6:] = 1e3, -1e3
    out2 = varlen_attention(q, k2, v2, cu)
    assert torch.equal(out[:6], out2[:6])
    # gradient of sample 0's output touches only sample 0's q/k/v
    out[:5].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[5:] == 0).all()) and bool(t.grad[:5].abs().sum() > 0)
    torch.autograd.gradcheck(lambda a, b, c: varlen_attention(a, b, c, cu), (q, k, v))


def test_single_token_segment_returns_its_value():
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    assert_close(varlen_attention(q, k, v, cu_seqlens_of([1])), v, atol=1e-6)


def test_bad_shapes():
    q = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, torch.randn(4, 2, 8), torch.randn(4, 2, 8), cu_seqlens_of([4]))
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected cu_seqlens_q\[-1\] = 4 \(the number of tokens\)"):
        varlen_attention(q, q, q, cu_seqlens_of([3]))


def int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# (cu_seqlens_q, cu_seqlens_k, Nq, Nk, error): layouts the kernel rejects, so the oracle must too
BAD_LAYOUTS = {
    "overlapping samples": (int32([0, 5, 3, 8]), None, 8, 8,
                            r"cu_seqlens_q: expected non-decreasing offsets, got cu_seqlens_q\[1\] = 5 > "
                            r"cu_seqlens_q\[2\] = 3"),
    "first offset not 0": (int32([2, 5, 8]), None, 8, 8, r"cu_seqlens_q: expected cu_seqlens_q\[0\] = 0, got 2"),
    "last offset not N": (int32([0, 3, 7]), None, 8, 8, r"cu_seqlens_q: expected cu_seqlens_q\[-1\] = 8"),
    "last offset past N": (int32([0, 3, 9]), None, 8, 8, r"cu_seqlens_q: expected cu_seqlens_q\[-1\] = 8"),
    "int64 offsets": (torch.tensor([0, 3, 8]), None, 8, 8, r"cu_seqlens_q: expected a \(B\+1,\) int32 tensor"),
    "2-D offsets": (int32([[0, 3, 8]]), None, 8, 8, r"cu_seqlens_q: expected a \(B\+1,\) int32 tensor"),
    "no offsets": (int32([]), None, 0, 0, r"cu_seqlens_q: expected a \(B\+1,\) int32 tensor"),
    "key count differs": (int32([0, 3, 8]), int32([0, 2, 4, 6]), 8, 6,
                          r"cu_seqlens_k: expected 2 segments like cu_seqlens_q, got 3"),
    "keys overlap": (int32([0, 3, 8]), int32([0, 4, 2]), 8, 2, r"cu_seqlens_k: expected non-decreasing offsets"),
    "keys first offset": (int32([0, 3, 8]), int32([1, 2, 6]), 8, 6, r"cu_seqlens_k: expected cu_seqlens_k\[0\] = 0"),
    "self-attention key rows": (int32([0, 3, 8]), None, 8, 6, r"k: self-attention needs as many key as query tokens"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_rejects_every_layout_the_kernel_rejects(case):
    from packdit.ops.attention import varlen_attention as kernel

    cu_q, cu_k, nq, nk, match = BAD_LAYOUTS[case]
    q, k = torch.randn(nq, 2, 8), torch.randn(nk, 2, 8)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, k, cu_q, cu_k)
    with pytest.raises(ValueError):  # the kernel's own message may word it differently
        kernel(q, k, k, cu_q, 8, cu_k, 8 if cu_k is not None else None)


def test_rejects_a_bad_grid_or_scale():
    q, cu = torch.randn(8, 2, 8), int32([0, 4, 8])
    for grid, match in [(int32([[1, 2, 2]]), r"grid: expected a \(2, 3\) integer tensor.*got torch.int32 of shape"),
                        (torch.tensor([[1.0, 2, 2], [1, 2, 2]]), r"grid: expected a \(2, 3\) integer tensor"),
                        (int32([[1, 2, 2], [-1, -2, 2]]), r"grid\[1\]: expected \(T, H, W\) >= 0, got \(-1, -2, 2\)"),
                        (int32([[1, 2, 2], [1, 2, 3]]), r"grid\[1\]: 1x2x3 tokens expected")]:
        with pytest.raises(ValueError, match=match):
            varlen_attention(q, q, q, cu, mode="spatial", grid=grid)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"scale: expected a finite softmax scale"):
            varlen_attention(q, q, q, cu, scale=scale)


@pytest.mark.parametrize("mode", ["full", "spatial", "temporal"])
def test_sdpa_calls_are_batched_4d(mode, monkeypatch):
    """Every SDPA call gets (batch, heads, L, D) inputs, which lets PyTorch pick a fused backend on a GPU; 3-D
    inputs always run its math backend, which holds every score (an H200 ran out of memory asking for 32 GiB
    of fp32 scores for a 31k-token video at 9 heads)."""
    import torch.nn.functional as F

    from packdit.reference import attention as reference_attention

    sdpa, dims = F.scaled_dot_product_attention, []

    def recorded(q, k, v, **kwargs):
        dims.append((q.dim(), k.dim(), v.dim()))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(reference_attention.F, "scaled_dot_product_attention", recorded)
    grid = torch.tensor([[2, 3, 4], [1, 2, 2]])
    q = torch.randn(28, 2, 8)
    cu = torch.tensor([0, 24, 28], dtype=torch.int32)
    varlen_attention(q, q, q, cu, mode=mode, grid=None if mode == "full" else grid)
    assert dims and set(dims) == {(4, 4, 4)}
