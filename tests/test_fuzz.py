"""Property-based tests over random packed layouts (hypothesis): invariants every packed op must keep.

* permuting the order of the samples in the pack permutes the outputs (and gradients) the same way;
* each sample's output depends on that sample only (computing it alone gives the same result);
* the planner places every sample exactly once, under the token cap.

Sizes stay tiny (the Triton kernels run under the CPU interpreter) and the example budget is fixed by
the hypothesis profile in conftest.py (``PACKDIT_SLOW=1`` selects the larger ``slow`` profile).
"""

import numpy as np
import pytest
import torch
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import packdit
from packdit.ops.attention import varlen_attention
from packdit.ops.modulate import modulated_norm
from packdit.packing import plan_steps

grids = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=5)


def _permuted_layout(grid_list, perm):
    seqs = packdit.PackedSeqs.from_grids(grid_list)
    pseqs = packdit.PackedSeqs.from_grids([grid_list[i] for i in perm])
    # token index map: position in the permuted pack -> position in the original pack
    starts = seqs.cu_seqlens.tolist()
    index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in perm]).long()
    return seqs, pseqs, index


@given(grid_list=grids, mode=st.sampled_from(["full", "spatial", "temporal"]), data=st.data())
def test_attention_permutation_and_isolation(grid_list, mode, data):
    perm = data.draw(st.permutations(range(len(grid_list))))
    seqs, pseqs, index = _permuted_layout(grid_list, perm)
    g = torch.Generator().manual_seed(len(grid_list))
    q, k, v = (torch.randn(seqs.num_tokens, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    rope = packdit.RoPE3D(100.0, (4, 4, 4))
    out = varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode=mode, seqs=seqs, rope=rope)
    qp, kp, vp = (t.detach()[index].requires_grad_() for t in (q, k, v))
    out_p = varlen_attention(qp, kp, vp, pseqs.cu_seqlens, pseqs.max_seqlen, mode=mode, seqs=pseqs, rope=rope)
    assert_close(out_p, out[index], atol=1e-5, rtol=1e-5, name="permuted output")
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    (out_p * w[index]).sum().backward()
    for a, b, name in ((qp, q, "dq"), (kp, k, "dk"), (vp, v, "dv")):
        assert_close(a.grad, b.grad[index], atol=1e-5, rtol=1e-4, name=name)
    # sample 0 alone
    n0 = seqs.seqlens[0]
    alone_seqs = packdit.PackedSeqs.from_grids(grid_list[:1])
    alone = varlen_attention(q[:n0], k[:n0], v[:n0], alone_seqs.cu_seqlens, alone_seqs.max_seqlen, mode=mode,
                             seqs=alone_seqs, rope=rope)
    assert_close(alone, out[:n0], atol=1e-5, rtol=1e-5, name="sample 0 alone")


@given(grid_list=grids, data=st.data())
def test_modulated_norm_permutation(grid_list, data):
    perm = data.draw(st.permutations(range(len(grid_list))))
    seqs, pseqs, index = _permuted_layout(grid_list, perm)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(seqs.num_tokens, 16, generator=g)
    shift, scale = torch.randn(len(grid_list), 16, generator=g), torch.randn(len(grid_list), 16, generator=g)
    out = modulated_norm(x, shift, scale, seqs.segment_ids)
    out_p = modulated_norm(x[index], shift[list(perm)], scale[list(perm)], pseqs.segment_ids)
    assert_close(out_p, out[index], atol=1e-6, rtol=1e-6)


@given(lengths=st.lists(st.integers(0, 100), min_size=0, max_size=200), ranks=st.integers(1, 8),
       window=st.integers(1, 8), capacity=st.integers(100, 400), seed=st.integers(0, 1000))
def test_planner_places_every_sample_once_under_the_cap(lengths, ranks, window, capacity, seed):
    plan = plan_steps(lengths, capacity=capacity, ranks=ranks, hidden_size=64, window=window, seed=seed)
    placed = [i for step in plan.steps for rank in step for i in rank]
    assert sorted(placed) == list(range(len(lengths)))
    arr = np.asarray(lengths, dtype=np.int64)
    for step in plan.steps:
        assert len(step) == ranks
        assert all(arr[rank].sum() <= capacity for rank in step if rank)


@pytest.mark.gpu
def test_attention_memory_is_linear_in_tokens():
    """A 64k-token sample would need 16 GiB for an fp32 score matrix; the kernel must stay O(N)."""
    n, heads, dim = 65536, 2, 64
    q, k, v = (torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = varlen_attention(q, k, v, cu, n)
    out.float().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 40 * q.numel() * q.element_size(), f"{extra / 2**20:.0f} MiB extra for {n} tokens"
