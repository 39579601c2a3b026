"""patchify / unpatchify ops (torch reference here; the CUDA kernel where built and a GPU exists) against
packdit.pack/unpack: bit-exact on random ragged layouts (empty samples, images, videos, dropped tokens,
channels_last, strided latents), autograd, errors, torch.compile; and PatchEmbed3D against the conv."""

import random

import pytest
import torch
from helpers import random_grids

import packdit
from packdit.nn import PatchEmbed3D
from packdit.ops import patchify as patchify_op
from packdit.ops.patchify import patchify, unpatchify
from packdit.reference.patchify import patchify_reference

PATCHES = [(1, 2, 2), (2, 1, 3)]


def _latents(seed, patch, device="cpu", dtype=torch.float32, strided=False, channels=3):
    """Random latents of random grids (some empty); pt == 1 samples with T = 1 are images (C, H, W)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    latents = []
    for t, h, w in random_grids(rng, rng.randint(1, 6), max_t=3, max_hw=5):
        shape = (channels, t * patch[0], h * patch[1], w * patch[2])
        if strided:  # a (C, T, W, H) tensor seen as (C, T, H, W): non-contiguous strides
            x = torch.randn(shape[0], shape[1], shape[3], shape[2]).to(device, dtype).transpose(2, 3)
        else:
            x = torch.randn(shape).to(device, dtype)
        latents.append(x[:, 0] if patch[0] == 1 and t == 1 and rng.random() < 0.5 else x)
    return latents


def _op_args(seqs):
    return seqs.cu_seqlens, seqs.segment_ids, seqs.raster_index() if seqs.dropped else None


def _grids(seqs):
    return [g for grid in seqs.grids for g in grid]


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_ops_equal_pack_and_unpack(patch, drop, seed):
    latents = _latents(seed, patch, strided=seed == 1)
    gen = torch.Generator().manual_seed(seed)
    tokens, seqs = packdit.pack(latents, patch, drop_rate=0.4 if drop else None, generator=gen)
    assert torch.equal(patchify(latents, *_op_args(seqs), list(patch), False), tokens)
    fill = -7.0 if seqs.dropped else None
    for channels_last in (False, True):
        samples = unpatchify(tokens, *_op_args(seqs), _grids(seqs), list(seqs.sample_ndims), list(patch),
                             channels_last, fill)
        expected = packdit.unpack(tokens, seqs, patch, channels_last=channels_last, fill_value=fill)
        assert all(torch.equal(a, b) for a, b in zip(samples, expected))
        if not seqs.dropped:  # round trip through the channels_last order
            back = patchify(samples, *_op_args(seqs), list(patch), channels_last)
            assert torch.equal(back, tokens)


def test_autograd_is_the_adjoint_copy():
    patch = (1, 2, 2)
    latents = [x.requires_grad_() for x in _latents(4, patch)]
    _, seqs = packdit.pack([x.detach() for x in latents], patch, drop_rate=0.3, generator=torch.Generator().manual_seed(0))
    tokens = patchify(latents, *_op_args(seqs), list(patch), False)
    weight = torch.randn_like(tokens)
    grads = torch.autograd.grad((tokens * weight).sum(), latents)
    ref_latents = [x.detach().requires_grad_() for x in latents]
    ref = patchify_reference(ref_latents, seqs.cu_seqlens, seqs.raster_index(), patch)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_latents)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    tokens = tokens.detach().requires_grad_()
    samples = unpatchify(tokens, *_op_args(seqs), _grids(seqs), list(seqs.sample_ndims), list(patch), True, 0.0)
    (g,) = torch.autograd.grad(sum((s * s).sum() for s in samples), tokens)
    assert torch.equal(g, 2 * tokens.detach())


def test_errors_name_the_argument():
    latents = [torch.randn(3, 2, 4, 4), torch.randn(3, 2, 2, 2)]
    tokens, seqs = packdit.pack(latents, (1, 2, 2))
    args = _op_args(seqs)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(latents, *args, [1, 2], False)
    with pytest.raises(ValueError, match=r"latents\[1\]: expected"):
        patchify([latents[0], torch.randn(4, 2, 2, 2)], *args, [1, 2, 2], False)
    with pytest.raises(ValueError, match=r"latents\[0\]: \(T, H, W\)"):
        patchify([torch.randn(3, 2, 3, 4), latents[1]], *args, [1, 2, 2], False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        patchify(latents, seqs.cu_seqlens[:-1], *args[1:], [1, 2, 2], False)
    with pytest.raises(ValueError, match="segment_ids: 9 tokens"):
        patchify(latents, seqs.cu_seqlens, seqs.segment_ids[:9], None, [1, 2, 2], False)
    with pytest.raises(ValueError, match="raster_index"):
        patchify(latents, seqs.cu_seqlens, seqs.segment_ids, seqs.segment_ids, [1, 2, 2], False)
    with pytest.raises(ValueError, match="tokens: expected shape"):
        unpatchify(tokens[:, :5], *args, _grids(seqs), [4, 4], [1, 2, 2], False, None)
    with pytest.raises(ValueError, match="grids"):
        unpatchify(tokens, *args, _grids(seqs)[:4], [4, 4], [1, 2, 2], False, None)


def test_compiles_fullgraph():
    patch = [1, 2, 2]
    latents = [torch.randn(4, 1, 4, 6), torch.randn(4, 2, 2, 2)]
    tokens, seqs = packdit.pack(latents, patch)
    args = _op_args(seqs)

    def round_trip(latents):
        tokens = patchify(latents, *args, patch, False)
        return unpatchify(tokens * 2, *args, _grids(seqs), list(seqs.sample_ndims), patch, False, None)

    out = torch.compile(round_trip, fullgraph=True, backend="aot_eager")(latents)
    assert all(torch.equal(a, 2 * b) for a, b in zip(out, latents))


@pytest.mark.parametrize("conv_cls, kernel", [(torch.nn.Conv3d, (2, 2, 2)), (torch.nn.Conv2d, (2, 2))])
def test_patch_embed_equals_conv(conv_cls, kernel):
    torch.manual_seed(0)
    conv = conv_cls(3, 16, kernel_size=kernel, stride=kernel)
    patch = packdit.layout.normalize_patch_size(kernel)
    latents = [torch.randn(3, 2 * patch[0], 4, 6), torch.randn(3, patch[0], 2, 8)]
    if conv_cls is torch.nn.Conv2d:
        latents = [x[:, 0] for x in latents]
    tokens, seqs = packdit.pack(latents, patch)
    embed = PatchEmbed3D.from_conv(conv)
    out = embed(tokens)
    expected = torch.cat([conv(x.unsqueeze(0))[0].flatten(1).t() for x in latents])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    fresh = PatchEmbed3D(3, 16, patch)
    fresh.load_state_dict({"proj.weight": conv.weight, "proj.bias": conv.bias})
    torch.testing.assert_close(fresh(tokens), out)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("drop", [False, True])
def test_cuda_kernel_bit_exact(dtype, patch, drop):
    for seed in range(3):
        latents = _latents(seed, patch, dtype=dtype, strided=seed == 2)
        gen = torch.Generator().manual_seed(seed)
        tokens, seqs = packdit.pack(latents, patch, drop_rate=0.4 if drop else None, generator=gen)
        cuda_latents = [x.cuda() for x in latents]
        cuda_seqs = seqs.to("cuda")
        assert patchify_op.implementation(cuda_latents[0]) == "cuda"
        cuda_tokens = packdit.pack_like(cuda_latents, cuda_seqs, patch)
        assert torch.equal(cuda_tokens.cpu(), tokens)
        fill = 3.0 if seqs.dropped else None
        for channels_last in (False, True):
            samples = packdit.unpack(cuda_tokens, cuda_seqs, patch, channels_last=channels_last, fill_value=fill)
            expected = packdit.unpack(tokens, seqs, patch, channels_last=channels_last, fill_value=fill)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(samples, expected))
        if not drop:
            cuda_tokens, _ = packdit.pack(cuda_latents, patch)
            assert torch.equal(cuda_tokens.cpu(), tokens)
