"""segment_pool / AttentionPool: per-sample reductions over packed tokens, no cross-sample leak."""

import torch
from helpers import assert_close

import packdit
from packdit.nn import AttentionPool, segment_pool


def _layout():
    latents = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2), torch.randn(1, 6, 2)]
    _, seqs = packdit.pack(latents, (1, 2, 2))
    seqs_with_empty = packdit.PackedSeqs.from_grids([(1, 2, 2), (0, 1, 1), (1, 1, 3)])
    return seqs, seqs_with_empty


def test_mean_and_sum_match_a_per_sample_loop_and_empty_is_zero():
    for seqs in _layout():
        x = torch.randn(seqs.num_tokens, 5, dtype=torch.float64, requires_grad=True)
        pieces = x.split(list(seqs.seqlens))
        want_mean = torch.stack([p.mean(0) if len(p) else torch.zeros(5, dtype=x.dtype) for p in pieces])
        want_sum = torch.stack([p.sum(0) for p in pieces])
        assert_close(segment_pool(x, seqs), want_mean, atol=1e-12)
        assert_close(segment_pool(x, seqs, "sum"), want_sum, atol=1e-12)
        torch.autograd.gradcheck(lambda a: segment_pool(a, seqs), (x,))


def test_attention_pool_sees_only_its_sample():
    torch.manual_seed(0)
    seqs, _ = _layout()
    pool = AttentionPool(8, num_heads=2).double()
    x = torch.randn(seqs.num_tokens, 8, dtype=torch.float64)
    out = pool(x, seqs)
    assert out.shape == (3, 8)
    x2 = x.clone()
    x2[8:] = 100.0  # tokens of samples 1 and 2 (sample 0 owns tokens 0..7)
    assert_close(pool(x2, seqs)[0], out[0], atol=1e-12)
    assert_close(out[2], attention_pool_one_sample(pool, x[9:]), atol=1e-10)


def attention_pool_one_sample(pool, xs):
    """Attention pooling of one sample written out: softmax(probe k^T / sqrt(d)) v per head, then proj."""
    heads, dim = pool.num_heads, xs.shape[1]
    k, v = pool.kv(xs).view(len(xs), 2, heads, dim // heads).unbind(1)
    q = pool.probe.view(heads, dim // heads)
    w = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / (dim // heads) ** 0.5, dim=-1)
    return pool.proj(torch.einsum("hn,nhd->hd", w, v).reshape(dim))
