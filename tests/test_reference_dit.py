"""packdit.reference.DiT against an independent transcription of the official DiT (tests/official_dit.py),
and its packed forward against its batch forward."""

import subprocess
import sys

import official_dit
import pytest
import torch
from helpers import assert_close, randomize_

from packdit import PackedSeqs, pack, unpack
from packdit.reference import DiT, DiT_models, get_2d_sincos_pos_embed

TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
ATOL = RTOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 0.1) weights so the zero-initialised adaLN/final layers act; eval mode."""
    return randomize_(model, seed).eval()


def _pair(seed: int = 0, **overrides):
    """(official, packdit) with the same random weights, loaded official -> packdit with strict=True."""
    official = _randomize(official_dit.DiT(**{**TINY, **overrides}), seed)
    ours = DiT(**{**TINY, **overrides}).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def _inputs(batch: int, size=(16, 16), seed: int = 1, num_classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def _patches_of(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*L, p*p*C), each patch in the (p, q, c) order of the DiT final layer."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b * (h // p) * (w // p), p * p * c)


# ---------------------------------------------------------------------- (1) state_dict layout
def _assert_same_layout(ours: torch.nn.Module, official: torch.nn.Module) -> None:
    a, b = ours.state_dict(), official.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
    assert [n for n, p in ours.named_parameters() if not p.requires_grad] == ["pos_embed"]
    assert [n for n, p in official.named_parameters() if not p.requires_grad] == ["pos_embed"]


@pytest.mark.parametrize("name", list(official_dit.CONFIGS))
def test_registry_state_dict_matches_official_on_meta(name):
    assert list(DiT_models) == list(official_dit.CONFIGS)
    with torch.device("meta"):
        ours, official = DiT_models[name](), official_dit.build(name)
    _assert_same_layout(ours, official)


@pytest.mark.parametrize("overrides", [
    {}, dict(learn_sigma=False), dict(class_dropout_prob=0.0), dict(input_size=24, patch_size=4, mlp_ratio=2.5),
])
def test_small_state_dict_matches_official(overrides):
    ours, official = DiT(**{**TINY, **overrides}), official_dit.DiT(**{**TINY, **overrides})
    _assert_same_layout(ours, official)


def test_registry_small_override():
    model = DiT_models["DiT-S/4"](input_size=8, depth=1, num_classes=3)
    assert (model.patch_size, model.num_heads, len(model.blocks), model.pos_embed.shape) == (4, 6, 1, (1, 4, 384))


# ---------------------------------------------------------------------- (2) checkpoint round trips
def test_official_weights_forward_matches():
    official, ours = _pair()
    x, t, y = _inputs(4)
    with torch.no_grad():
        assert_close(ours(x, t, y), official(x, t, y), atol=ATOL, rtol=RTOL, name="forward")
        y_cfg = torch.cat([y[:2], torch.full((2,), 10)])
        assert_close(ours.forward_with_cfg(x, t, y_cfg, 4.0), official.forward_with_cfg(x, t, y_cfg, 4.0),
                     atol=ATOL, rtol=RTOL, name="forward_with_cfg")


@pytest.mark.parametrize("overrides", [dict(learn_sigma=False, class_dropout_prob=0.0), dict(patch_size=4)])
def test_our_weights_load_into_official(overrides):
    ours = _randomize(DiT(**{**TINY, **overrides}), seed=3)
    official = official_dit.DiT(**{**TINY, **overrides}).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x, t, y = _inputs(3)
    with torch.no_grad():
        assert_close(ours(x, t, y), official(x, t, y), atol=ATOL, rtol=RTOL, name="forward")


def test_forward_with_cfg_guides_three_channels():
    _, ours = _pair()
    x, t, y = _inputs(4)
    y_cfg = torch.cat([y[:2], torch.full((2,), 10)])
    with torch.no_grad():
        out = ours.forward_with_cfg(x, t, y_cfg, 3.0)
        raw = ours(torch.cat([x[:2], x[:2]]), t, y_cfg)
    cond, uncond = raw[:2, :3], raw[2:, :3]
    guided = uncond + 3.0 * (cond - uncond)
    assert_close(out[:, :3], torch.cat([guided, guided]), atol=ATOL, rtol=RTOL, name="guided")
    assert torch.equal(out[:, 3:], raw[:, 3:])


# ---------------------------------------------------------------------- (3) same seed, same init
@pytest.mark.parametrize("overrides", [{}, dict(learn_sigma=False, class_dropout_prob=0.0, patch_size=4)])
def test_same_seed_same_init(overrides):
    torch.manual_seed(123)
    official = official_dit.DiT(**{**TINY, **overrides}).state_dict()
    after_official = torch.rand(4)
    torch.manual_seed(123)
    ours = DiT(**{**TINY, **overrides}).state_dict()
    assert torch.equal(torch.rand(4), after_official), "construction consumed a different amount of randomness"
    for key in official:
        if key == "pos_embed":
            assert_close(ours[key], official[key], atol=1e-7, rtol=0, name=key)
        else:
            assert torch.equal(ours[key], official[key]), key
    assert not ours["final_layer.linear.weight"].any() and not ours["blocks.1.adaLN_modulation.1.bias"].any()


# ---------------------------------------------------------------------- (4) position embedding
@pytest.mark.parametrize("dim, side", [(64, 1), (64, 8), (384, 16), (1152, 32)])
def test_pos_embed_matches_official_table(dim, side):
    h = torch.arange(side).repeat_interleave(side)
    w = torch.arange(side).repeat(side)
    ours = get_2d_sincos_pos_embed(dim, h, w)
    want = torch.from_numpy(official_dit.get_2d_sincos_pos_embed(dim, side))
    assert ours.dtype == torch.float64
    assert_close(ours, want, atol=1e-12, rtol=0, name="float64 table")
    assert_close(ours.float(), want.float(), atol=1e-7, rtol=0, name="float32 table")


def test_model_pos_embed_is_official_table():
    model = DiT(**{**TINY, "input_size": 32})
    want = torch.from_numpy(official_dit.get_2d_sincos_pos_embed(64, 16)).float()
    assert_close(model.pos_embed[0], want, atol=1e-7, rtol=0)


def test_pos_embed_non_square_is_positionwise():
    """A token at (h, w) of a 3 x 5 grid gets the row of (h, w) in the square 5 x 5 official table (w first)."""
    grid_h, grid_w = 3, 5
    h = torch.arange(grid_h).repeat_interleave(grid_w)
    w = torch.arange(grid_w).repeat(grid_h)
    table = torch.from_numpy(official_dit.get_2d_sincos_pos_embed(32, 5))
    assert_close(get_2d_sincos_pos_embed(32, h, w), table[h * 5 + w], atol=1e-12, rtol=0)
    assert not torch.allclose(get_2d_sincos_pos_embed(32, h, w), get_2d_sincos_pos_embed(32, w, h))
    with pytest.raises(ValueError, match="multiple of 4"):
        get_2d_sincos_pos_embed(30, h, w)


# ---------------------------------------------------------------------- (5, 7) packed == batch
def test_forward_packed_same_size_equals_forward():
    official, ours = _pair()
    x, t, y = _inputs(3)
    tokens, seqs = pack(list(x), patch_size=(1, 2, 2))
    with torch.no_grad():
        packed = ours.forward_packed(tokens, seqs, t, y)
        images = ours(x, t, y)
        want = official(x, t, y)
    assert packed.shape == (3 * 64, 2 * 2 * 8)
    assert_close(packed, _patches_of(images, 2), atol=ATOL, rtol=RTOL, name="packed tokens vs forward")
    assert_close(packed, _patches_of(want, 2), atol=ATOL, rtol=RTOL, name="packed tokens vs official")


def test_unpack_channels_last_gives_forward_images():
    _, ours = _pair(patch_size=4)
    x, t, y = _inputs(2)
    tokens, seqs = pack(list(x), patch_size=(1, 4, 4))
    with torch.no_grad():
        images = unpack(ours.forward_packed(tokens, seqs, t, y), seqs, (1, 4, 4), channels_last=True)
        want = ours(x, t, y)
    assert [tuple(i.shape) for i in images] == [(8, 16, 16)] * 2
    assert_close(torch.stack(images), want, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------- (6) mixed sizes
MIXED_SIZES = [(16, 16), (8, 8), (4, 12), (12, 4), (2, 2)]


def test_mixed_sizes_match_each_sample_alone():
    _, ours = _pair()
    g = torch.Generator().manual_seed(5)
    latents = [torch.randn(4, h, w, generator=g) for h, w in MIXED_SIZES]
    t = torch.tensor([3, 500, 999, 0, 42])
    y = torch.tensor([1, 2, 3, 10, 9])   # 10 = null class
    with torch.no_grad():
        tokens, seqs = pack(latents, patch_size=(1, 2, 2))
        packed = ours.forward_packed(tokens, seqs, t, y)
        listed = ours.forward_list(latents, t, y)
        for b, x in enumerate(latents):
            alone_tokens, alone_seqs = pack([x], patch_size=(1, 2, 2))
            alone = ours.forward_packed(alone_tokens, alone_seqs, t[b:b + 1], y[b:b + 1])
            start, end = seqs.cu_seqlens[b].item(), seqs.cu_seqlens[b + 1].item()
            assert_close(packed[start:end], alone, atol=ATOL, rtol=RTOL, name=f"sample {b} packed vs alone")
            image = ours(x[None], t[b:b + 1], y[b:b + 1])[0]
            assert listed[b].shape == image.shape == (8, *MIXED_SIZES[b])
            assert_close(listed[b], image, atol=ATOL, rtol=RTOL, name=f"sample {b} forward_list vs forward")


def test_mixed_sizes_with_dropped_tokens_keep_true_positions():
    _, ours = _pair()
    g = torch.Generator().manual_seed(6)
    latents = [torch.randn(4, h, w, generator=g) for h, w in [(8, 12), (6, 6)]]
    t, y = torch.tensor([10, 20]), torch.tensor([1, 2])
    tokens, seqs = pack(latents, patch_size=(1, 2, 2), drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    assert seqs.dropped
    raster = seqs.raster_index().split(list(seqs.seqlens))
    with torch.no_grad():
        out = ours.forward_packed(tokens, seqs, t, y)
        for b, sample_tokens in enumerate(tokens.split(list(seqs.seqlens))):
            alone_seqs = PackedSeqs.from_grids([seqs.grids[b]], kept=[raster[b]])
            alone = ours.forward_packed(sample_tokens, alone_seqs, t[b:b + 1], y[b:b + 1])
            start, end = seqs.cu_seqlens[b].item(), seqs.cu_seqlens[b + 1].item()
            assert_close(out[start:end], alone, atol=ATOL, rtol=RTOL, name=f"sample {b}")


# ---------------------------------------------------------------------- (8) errors
def test_forward_packed_rejects_video_and_wrong_width():
    model = DiT(**TINY)
    t, y = torch.tensor([1]), torch.tensor([2])
    tokens, seqs = pack([torch.randn(4, 2, 8, 8)], patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match="T=2"):
        model.forward_packed(tokens, seqs, t, y)
    tokens, seqs = pack([torch.randn(4, 8, 8)], patch_size=(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        model.forward_packed(tokens, seqs, t, y)
    tokens, seqs = pack([torch.randn(4, 8, 8)], patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match="one entry per sample"):
        model.forward_packed(tokens, seqs, torch.tensor([1, 2]), y)


def test_forward_rejects_bad_shapes():
    model = DiT(**TINY)
    t, y = torch.tensor([1]), torch.tensor([2])
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 16, 15), t, y)
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(1, 3, 16, 16), t, y)


# ---------------------------------------------------------------------- (9) label dropout
def test_token_drop_matches_official():
    official, ours = _pair(class_dropout_prob=0.5)
    labels = torch.arange(10).repeat(4)
    torch.manual_seed(7)
    want = official.y_embedder.token_drop(labels)
    torch.manual_seed(7)
    got = ours.y_embedder.token_drop(labels)
    assert torch.equal(got, want)
    assert 0 < int((got == 10).sum()) < len(labels)
    assert torch.equal(got[got != 10], labels[got != 10])

    force = torch.tensor([1, 0, 1, 0])
    assert ours.y_embedder.token_drop(labels[:4], force).tolist() == [10, 1, 10, 3]
    assert torch.equal(ours.y_embedder(labels[:4], train=False, force_drop_ids=force),
                       ours.y_embedder.embedding_table.weight[torch.tensor([10, 1, 10, 3])])


def test_label_dropout_only_in_training_and_with_null_class():
    official, ours = _pair(class_dropout_prob=0.5)
    labels = torch.arange(10)
    assert torch.equal(ours.y_embedder(labels, train=False), ours.y_embedder.embedding_table.weight[:10])
    assert ours.y_embedder.embedding_table.num_embeddings == 11

    _, no_cfg = _pair(class_dropout_prob=0.0)
    assert no_cfg.y_embedder.embedding_table.num_embeddings == 10
    assert torch.equal(no_cfg.y_embedder(labels, train=True), no_cfg.y_embedder.embedding_table.weight)

    official.train(), ours.train()
    x, t, y = _inputs(8)
    with torch.no_grad():
        torch.manual_seed(11)
        want = official(x, t, y)
        torch.manual_seed(11)
        got = ours(x, t, y)
    assert_close(got, want, atol=ATOL, rtol=RTOL, name="training forward with label dropout")


def test_reference_package_does_not_import_triton():
    code = "import sys, packdit.reference; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
