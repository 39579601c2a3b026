"""patchify / unpatchify through the dispatcher -- the PyTorch reference here, the CUDA kernel where built and a
GPU exists -- against an independent coordinate gather and packdit.pack/unpack: bit-exact on random ragged
layouts (empty samples, images, videos, dropped tokens, channels_last, strided latents), autograd, errors,
torch.compile; and PatchEmbed against the conv."""

import random

import pytest
import torch
from helpers import gather_patchify, gather_unpatchify, random_grids

import packdit
from packdit.nn import PatchEmbed
from packdit.nn import functional as PF
from packdit.ops.patchify import patchify, unpatchify

PATCHES = [(1, 2, 2), (2, 1, 3)]
# (backend, device): the reference everywhere, the CUDA kernel where packdit._C has it
BACKENDS = [("torch", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.cuda_ext)]


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


def _gather_args(seqs):
    return seqs.cu_seqlens.cpu(), seqs.raster_index().cpu() if seqs.dropped else None


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_pack_and_unpack_equal_the_coordinate_gather(patch, drop, seed):
    latents = _latents(seed, patch, strided=seed == 1)
    gen = torch.Generator().manual_seed(seed)
    tokens, seqs = packdit.pack(latents, patch, drop_rate=0.4 if drop else None, generator=gen)
    assert torch.equal(gather_patchify(latents, *_gather_args(seqs), patch), tokens)
    fill = -7.0 if seqs.dropped else None
    for channels_last in (False, True):
        samples = packdit.unpack(tokens, seqs, patch, channels_last=channels_last, fill_value=fill)
        expected = gather_unpatchify(tokens, *_gather_args(seqs), seqs.grids, seqs.sample_ndims, patch,
                                     channels_last, fill)
        assert all(torch.equal(a, b) for a, b in zip(samples, expected))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_ops_equal_the_coordinate_gather(backend, device, patch, drop, seed):
    latents = _latents(seed, patch, strided=seed == 1)
    gen = torch.Generator().manual_seed(seed)
    _, seqs = packdit.pack(latents, patch, drop_rate=0.4 if drop else None, generator=gen)
    expected = gather_patchify(latents, *_gather_args(seqs), patch)
    latents, seqs = [x.to(device) for x in latents], seqs.to(device)
    tokens = PF.patchify(latents, *_op_args(seqs), patch, False, backend=backend)
    assert torch.equal(tokens.cpu(), expected)
    fill = -7.0 if seqs.dropped else None
    for channels_last in (False, True):
        samples = PF.unpatchify(tokens, *_op_args(seqs), _grids(seqs), list(seqs.sample_ndims), patch,
                                channels_last, fill, backend=backend)
        want = gather_unpatchify(tokens.cpu(), *_gather_args(seqs), seqs.grids, seqs.sample_ndims, patch,
                                 channels_last, fill)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(samples, want))
        if not seqs.dropped:  # round trip through the channels_last order
            back = PF.patchify(samples, *_op_args(seqs), patch, channels_last, backend=backend)
            assert torch.equal(back, tokens)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_autograd_is_the_adjoint_copy(backend, device):
    patch = (1, 2, 2)
    latents = [x.to(device).requires_grad_() for x in _latents(4, patch)]
    _, seqs = packdit.pack([x.detach() for x in latents], patch, drop_rate=0.3,
                           generator=torch.Generator().manual_seed(0))
    tokens = PF.patchify(latents, *_op_args(seqs), patch, False, backend=backend)
    weight = torch.randn_like(tokens)
    grads = torch.autograd.grad((tokens * weight).sum(), latents)
    ref_latents = [x.detach().requires_grad_() for x in latents]
    ref = gather_patchify(ref_latents, seqs.cu_seqlens, seqs.raster_index(), patch)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_latents)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    tokens = tokens.detach().requires_grad_()
    samples = PF.unpatchify(tokens, *_op_args(seqs), _grids(seqs), list(seqs.sample_ndims), patch, True, 0.0,
                            backend=backend)
    (g,) = torch.autograd.grad(sum((s * s).sum() for s in samples), tokens)
    assert torch.equal(g, 2 * tokens.detach())


def test_kernel_errors_name_the_argument():
    """The CUDA ops check their arguments first (also on the CPU), then refuse a device they cannot run on."""
    latents = [torch.randn(3, 2, 4, 4), torch.randn(3, 2, 2, 2)]
    tokens, seqs = packdit.pack(latents, (1, 2, 2))
    args = _op_args(seqs)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(latents, *args, [1, 2], False)
    with pytest.raises(ValueError, match=r"latents\[1\]: expected"):
        patchify([latents[0], torch.randn(4, 2, 2, 2)], *args, [1, 2, 2], False)
    with pytest.raises(ValueError, match=r"latents\[0\]: H=3 is not divisible"):
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
    with pytest.raises(ValueError, match="CUDA kernel is not supported because the tensors are on cpu"):
        patchify(latents, *args, [1, 2, 2], False)
    with pytest.raises(PF.BackendUnavailableError, match="backend='cuda' is not supported because"):
        PF.patchify(latents, *args, [1, 2, 2], False, backend="cuda")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_compiles_fullgraph(backend, device):
    patch = [1, 2, 2]
    latents = [torch.randn(4, 1, 4, 6, device=device), torch.randn(4, 2, 2, 2, device=device)]
    tokens, seqs = packdit.pack(latents, patch)
    args = _op_args(seqs)

    def round_trip(latents):
        tokens = PF.patchify(latents, *args, patch, False, backend=backend)
        return PF.unpatchify(tokens * 2, *args, _grids(seqs), list(seqs.sample_ndims), patch, False, None,
                             backend=backend)

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
    embed = PatchEmbed.from_conv(conv)
    out = embed(tokens)
    expected = torch.cat([conv(x.unsqueeze(0))[0].flatten(1).t() for x in latents])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    fresh = PatchEmbed(3, 16, kernel)
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
        assert PF.use_kernel("patchify", cuda_latents[0].device, None)
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
