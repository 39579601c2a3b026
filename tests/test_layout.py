"""pack / unpack / PackedSeqs: round trips, conv equivalence, token dropping, errors, compile."""

import random

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from helpers import assert_close, random_grids
from hypothesis import given, settings
from hypothesis import strategies as st

import packdit
from packdit import PackedSeqs, pack, pack_like, unpack


def _latents(grids, patch, c=3, seed=0, images=()):
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = patch
    out = []
    for b, (t, h, w) in enumerate(grids):
        if b in images:
            out.append(torch.randn(c, h * ph, w * pw, generator=g))
        else:
            out.append(torch.randn(c, t * pt, h * ph, w * pw, generator=g))
    return out


def _expected_layout(grids):
    """Positions / segment ids by an explicit loop: the definition of the raster order."""
    positions, segs = [], []
    for b, (t, h, w) in enumerate(grids):
        for i in range(t):
            for j in range(h):
                for k in range(w):
                    positions.append((i, j, k))
                    segs.append(b)
    return torch.tensor(positions, dtype=torch.int32).reshape(-1, 3), torch.tensor(segs, dtype=torch.int32)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 1, 3)])
def test_round_trip_and_metadata(patch):
    grids = [(2, 3, 4), (1, 1, 1), (3, 2, 5), (1, 5, 2), (0, 2, 2)]
    latents = _latents(grids, patch)
    tokens, seqs = pack(latents, patch)
    pt, ph, pw = patch
    assert tokens.shape == (sum(t * h * w for t, h, w in grids), 3 * pt * ph * pw)
    assert tokens.is_contiguous()
    assert len(seqs) == len(grids)
    assert seqs.seqlens == tuple(t * h * w for t, h, w in grids)
    assert seqs.max_seqlen == max(seqs.seqlens)
    assert seqs.cu_seqlens.dtype == torch.int32 and seqs.cu_seqlens.tolist()[-1] == tokens.shape[0]
    assert seqs.grid.tolist() == [list(g) for g in grids]
    positions, segs = _expected_layout(grids)
    assert torch.equal(seqs.positions, positions)
    assert torch.equal(seqs.segment_ids, segs)
    assert torch.equal(seqs.lengths, torch.tensor(seqs.seqlens, dtype=torch.int32))
    for x, y in zip(unpack(tokens, seqs, patch), latents):
        assert torch.equal(x, y)


def test_images_come_back_as_images():
    latents = [torch.randn(4, 6, 8), torch.randn(4, 3, 4, 2), torch.randn(4, 2, 2)]
    tokens, seqs = pack(latents, 2)
    assert seqs.sample_ndims == (3, 4, 3)
    back = unpack(tokens, seqs, 2)
    assert [b.shape for b in back] == [x.shape for x in latents]
    assert all(torch.equal(a, b) for a, b in zip(back, latents))


def test_linear_on_tokens_equals_conv3d_patch_embedding():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 2, 2), stride=(2, 2, 2), dtype=torch.float64)
    latents = [torch.randn(3, 4, 6, 8, dtype=torch.float64), torch.randn(3, 2, 2, 4, dtype=torch.float64)]
    tokens, seqs = pack(latents, (2, 2, 2))
    embedded = F.linear(tokens, conv.weight.flatten(1), conv.bias)
    expected = torch.cat([conv(x[None])[0].flatten(1).T for x in latents])
    assert_close(embedded, expected, atol=1e-12, rtol=1e-12, name="conv3d")


def test_linear_on_tokens_equals_conv2d_patch_embedding_for_images():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, kernel_size=2, stride=2, dtype=torch.float64)
    latents = [torch.randn(4, 8, 4, dtype=torch.float64), torch.randn(4, 2, 6, dtype=torch.float64)]
    tokens, seqs = pack(latents, 2)
    expected = torch.cat([conv(x[None])[0].flatten(1).T for x in latents])
    assert_close(F.linear(tokens, conv.weight.flatten(1), conv.bias), expected, atol=1e-12, rtol=1e-12)


def test_channels_last_unpack_matches_official_unpatchify():
    """The official DiT reads final-layer tokens as (p, q, c): einsum('nhwpqc->nchpwq')."""
    p, c, h, w = 2, 3, 4, 5
    x = torch.randn(1, h * w, p * p * c)
    official = torch.einsum("nhwpqc->nchpwq", x.reshape(1, h, w, p, p, c)).reshape(1, c, h * p, w * p)
    _, seqs = pack([torch.zeros(c, h * p, w * p)], p)
    assert torch.equal(unpack(x[0], seqs, p, channels_last=True)[0], official[0])


# ---------------------------------------------------------------------- token dropping
def test_drop_keeps_true_positions_and_raster_order():
    latents = _latents([(2, 4, 4), (1, 3, 5), (1, 1, 1)], (1, 2, 2))
    full_tokens, full = pack(latents, 2)
    tokens, seqs = pack(latents, 2, drop_rate=0.5, generator=torch.Generator().manual_seed(1))
    assert seqs.dropped
    assert seqs.seqlens == (16, 8, 1)  # L - floor(0.5 L): a 1-token sample keeps its token
    raster = seqs.raster_index()
    full_raster = full.raster_index()
    for b, r in enumerate(raster.split(list(seqs.seqlens))):
        assert bool((r[1:] > r[:-1]).all()), f"sample {b} not in raster order"
        sel = full.cu_seqlens[b].item() + r
        assert torch.equal(seqs.positions[seqs.segment_ids == b], full.positions[sel])
        assert torch.equal(tokens[seqs.segment_ids == b], full_tokens[sel])
    assert full_raster.shape[0] == full.num_tokens


def test_drop_is_deterministic_and_callable_rate():
    latents = _latents([(1, 8, 8), (1, 2, 2)], (1, 1, 1))
    rate = lambda grid: 0.75 if grid[1] * grid[2] > 16 else 0.0  # noqa: E731
    a = pack(latents, 1, drop_rate=rate, generator=torch.Generator().manual_seed(3))
    b = pack(latents, 1, drop_rate=rate, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].positions, b[1].positions)
    assert a[1].seqlens == (16, 4)


def test_full_drop_gives_empty_segment():
    latents = _latents([(1, 2, 2), (1, 3, 3)], (1, 1, 1))
    tokens, seqs = pack(latents, 1, drop_rate=lambda g: 1.0 if g[1] == 2 else 0.0)
    assert seqs.seqlens == (0, 9)
    assert torch.equal(tokens, latents[1].reshape(3, 9).T)


def test_unpack_refuses_dropped_layout_and_scatters_with_fill():
    latents = _latents([(1, 4, 4), (1, 2, 6)], (1, 2, 2))
    tokens, seqs = pack(latents, 2, drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="dropped tokens.*fill_value"):
        unpack(tokens, seqs, 2)
    filled = unpack(tokens, seqs, 2, fill_value=float("nan"))
    for x, y in zip(filled, latents):
        assert x.shape == y.shape
        kept = ~torch.isnan(x)
        assert torch.equal(x[kept], y[kept])
        assert 0 < int(kept.sum()) < y.numel()


def test_pack_like_targets_follow_the_same_drops():
    latents = _latents([(2, 2, 4), (1, 3, 3)], (1, 1, 1))
    targets = [x * 2 + 1 for x in latents]
    tokens, seqs = pack(latents, 1, drop_rate=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pack_like(targets, seqs, 1), tokens * 2 + 1)
    with pytest.raises(ValueError, match=r"latents\[1\]: patch grid"):
        pack_like([targets[0], targets[0][:, :1]], seqs, 1)


def test_from_grids_rejects_bad_kept_indices():
    with pytest.raises(ValueError, match=r"kept\[0\]"):
        PackedSeqs.from_grids([(1, 2, 2)], kept=[torch.tensor([2, 1])])
    with pytest.raises(ValueError, match=r"kept\[1\].*\[0, 4\)"):
        PackedSeqs.from_grids([(1, 2, 2), (1, 2, 2)], kept=[None, torch.tensor([0, 4])])


def test_from_grids_refuses_grids_whose_raster_index_overflows_int32():
    """A grid of >= 2^31 cells keeping two tokens: the raster index of the last one does not fit int32 (the
    positions came out negative, and the layout was marked valid). Nothing of grid size is allocated."""
    with pytest.raises(ValueError, match=r"grids\[1\]: .* 2147483648 cells"):
        PackedSeqs.from_grids([(1, 1, 1), (2, 2**15, 2**15)], kept=[None, torch.tensor([0, 2**31 - 1])])
    with pytest.raises(ValueError, match=r"grids\[0\]: .* 4294967296 cells"):
        PackedSeqs.from_grids([(0, 2**32, 1)])
    largest = PackedSeqs.from_grids([(1, 2**15, 2**16 - 1)], kept=[torch.tensor([0, 2**31 - 2**15 - 1])])
    assert largest.positions.tolist() == [[0, 0, 0], [0, 2**15 - 1, 2**16 - 2]]
    with pytest.raises(ValueError, match=r"grids\[0\]: expected \(T, H, W\) of non-negative ints"):
        PackedSeqs.from_grids([(1, 2.5, 2)])  # was truncated to (1, 2, 2)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "latents, patch, exc, match",
    [
        ([], 2, ValueError, "empty list"),
        (torch.zeros(1, 4, 4, 4), 2, TypeError, "list of"),
        ([torch.zeros(4, 4, 4), torch.zeros(3, 4, 4)], 2, ValueError, r"latents\[1\]: expected C=4"),
        ([torch.zeros(4, 4, 4), torch.zeros(4, 5, 4)], 2, ValueError, r"latents\[1\]: H=5 is not divisible"),
        ([torch.zeros(4, 3, 4, 4)], (2, 2, 2), ValueError, r"latents\[0\]: T=3 is not divisible"),
        ([torch.zeros(4, 4, 4, dtype=torch.int64)], 2, TypeError, r"latents\[0\]: expected a floating"),
        ([torch.zeros(1, 4, 2, 4, 4)], 2, ValueError, r"latents\[0\]: expected .* got 5-D"),
        ([torch.zeros(4, 4, 4)], (2, 2, 2), ValueError, r"latents\[0\]: image .* pt=2"),
        ([torch.zeros(4, 4, 4), torch.zeros(4, 4, 4, dtype=torch.float64)], 2, ValueError,
         r"latents\[1\]: expected dtype"),
        ([torch.zeros(4, 4, 4)], (0, 2, 2), ValueError, "patch_size"),
        ([torch.zeros(4, 4, 4)], (1, 2, 2, 2), ValueError, "patch_size"),
    ],
)
def test_bad_input_errors(latents, patch, exc, match):
    with pytest.raises(exc, match=match):
        pack(latents, patch)


def test_more_than_int32_tokens_is_refused_before_allocating():
    huge = torch.empty(1, 1024, 2048, 2048, device="meta")  # 2^32 tokens at patch 1
    with pytest.raises(ValueError, match="int32"):
        pack([huge], 1)


def test_drop_rate_out_of_range():
    with pytest.raises(ValueError, match=r"drop_rate: expected a number in \[0, 1\], got 1.5"):
        pack([torch.zeros(1, 4, 4)], 1, drop_rate=1.5)
    with pytest.raises(ValueError, match=r"drop_rate: expected a number in \[0, 1\], got '0.5'"):
        pack([torch.zeros(1, 4, 4)], 1, drop_rate="0.5")  # was read as 0.5
    with pytest.raises(ValueError, match=r"drop_rate\(\(1, 4, 4\)\): expected a number in \[0, 1\], got None"):
        pack([torch.zeros(1, 4, 4)], 1, drop_rate=lambda grid: None)
    with pytest.raises(ValueError, match=r"drop_rate\(\(1, 4, 4\)\): expected a number in \[0, 1\], got '0.2'"):
        pack([torch.zeros(1, 4, 4)], 1, drop_rate=lambda grid: "0.2")


def test_from_grids_refuses_kept_indices_it_would_truncate_or_flatten():
    with pytest.raises(ValueError, match=r"kept\[0\]: expected a 1-D integer tensor of raster indices, got "
                                         r"torch.float32 of shape \(2,\)"):
        PackedSeqs.from_grids([(1, 2, 2)], kept=[torch.tensor([0.0, 2.5])])  # 2.5 was truncated to 2
    with pytest.raises(ValueError, match=r"kept\[0\]: .* of shape \(1, 2\)"):
        PackedSeqs.from_grids([(1, 2, 2)], kept=[torch.tensor([[0, 2]])])
    assert PackedSeqs.from_grids([(1, 2, 2)], kept=[[0, 2]]).positions.tolist() == [[0, 0, 0], [0, 1, 0]]
    assert PackedSeqs.from_grids([(1, 2, 2)], kept=[[]]).seqlens == (0,)


def test_unpack_shape_errors():
    tokens, seqs = pack([torch.zeros(3, 4, 4)], 2)
    with pytest.raises(ValueError, match="tokens: expected shape"):
        unpack(tokens[:-1], seqs, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        unpack(tokens[:, :-1], seqs, 2)


# ---------------------------------------------------------------------- PackedSeqs object
def test_to_keeps_host_metadata_and_pytree_round_trip():
    _, seqs = pack(_latents([(1, 2, 2), (2, 1, 3)], (1, 1, 1), images=(0,)), 1)
    moved = seqs.to("cpu")
    assert moved.seqlens == seqs.seqlens and moved.sample_ndims == seqs.sample_ndims
    leaves, spec = pytree.tree_flatten(seqs)
    assert leaves[-1] == seqs.max_seqlen and len(leaves) == 5
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, PackedSeqs) and back.seqlens == seqs.seqlens and back.sample_ndims == (3, 4)
    doubled = pytree.tree_map_only(torch.Tensor, lambda t: t * 1, seqs)
    assert torch.equal(doubled.positions, seqs.positions)
    paths = [pytree.keystr(k) for k, _ in pytree.tree_flatten_with_path(seqs)[0]]
    assert ".cu_seqlens" in paths and ".max_seqlen" in paths


def test_compile_takes_packed_seqs_without_recompiling_for_new_lengths():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def per_token_sample_length(x, seqs):
        lengths = seqs.cu_seqlens[1:] - seqs.cu_seqlens[:-1]
        return x * lengths[seqs.segment_ids.long()].unsqueeze(-1) / seqs.max_seqlen

    # B >= 2 throughout: dynamo specializes sizes 0 and 1, so a single-sample batch is one more graph
    for grids in ([(1, 2, 3), (1, 1, 5)], [(1, 3, 3), (1, 2, 2), (1, 1, 1)], [(2, 2, 2), (1, 1, 1)], [(1, 1, 1)] * 5):
        tokens, seqs = pack(_latents(grids, (1, 1, 1), c=8), 1)  # C=8 never equals B+1 (duck sizing)
        ref = tokens * seqs.lengths[seqs.segment_ids.long()].unsqueeze(-1) / seqs.max_seqlen
        assert_close(per_token_sample_length(tokens, seqs), ref)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


# ---------------------------------------------------------------------- randomized
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 6),
    patch=st.sampled_from([(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 1, 3)]),
    drop=st.sampled_from([None, 0.0, 0.25, 0.9, 1.0]),
)
def test_randomized_layouts(seed, n, patch, drop):
    rng = random.Random(seed)
    grids = random_grids(rng, n, max_t=3, max_hw=4)
    images = tuple(b for b, g in enumerate(grids) if g[0] == 1 and patch[0] == 1 and rng.random() < 0.5)
    latents = _latents(grids, patch, c=2, seed=seed, images=images)
    tokens, seqs = pack(latents, patch, drop_rate=drop, generator=torch.Generator().manual_seed(seed))
    assert tokens.shape[0] == seqs.num_tokens == int(seqs.cu_seqlens[-1])
    assert torch.equal(seqs.segment_ids, torch.repeat_interleave(torch.arange(n, dtype=torch.int32), seqs.lengths))
    g = seqs.grid[seqs.segment_ids.long()]
    assert bool(((seqs.positions >= 0) & (seqs.positions < g)).all())
    if not seqs.dropped:
        assert all(torch.equal(a, b) for a, b in zip(unpack(tokens, seqs, patch), latents))
    filled = unpack(tokens, seqs, patch, fill_value=0.0)
    assert torch.equal(pack_like(filled, seqs, patch), tokens)


def test_public_names():
    assert packdit.__version__
    assert {"pack", "unpack", "pack_like", "PackedSeqs"} <= set(packdit.__all__)


def test_million_token_layout_builds_on_cpu():
    grids = [(16, 32, 64)] * 32  # 32 clips of 32,768 tokens: 1,048,576 tokens
    seqs = PackedSeqs.from_grids(grids)
    assert seqs.num_tokens == 2**20 and seqs.max_seqlen == 32768
    assert seqs.positions[-1].tolist() == [15, 31, 63] and int(seqs.segment_ids[-1]) == 31
