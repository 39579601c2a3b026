"""packdit.DiT: official compatibility via the reference, packed equivalences, video/NaViT options, DiTConfig."""

import dataclasses

import pytest
import torch
from helpers import assert_close, randomize_

import packdit
from packdit import reference
from packdit.models.config import DIT_CONFIGS, DiTConfig, default_rope
from packdit.models.dit import DiT, DiT_models
from packdit.rope import RoPE3D

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
# no label dropout: train-mode calls compared with each other must see the same labels
VIDEO = dict(input_size=8, patch_size=(1, 2, 2), in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
             learn_sigma=False, class_dropout_prob=0.0)


def _randomize(model, seed=0):
    """Non-zero weights everywhere (adaLN-Zero init would make every block the identity)."""
    return randomize_(model, seed, std=0.2)


@pytest.mark.parametrize("name", list(reference.DiT_models))
def test_state_dict_matches_reference_on_meta(name):
    with torch.device("meta"):
        ours, ref = DiT_models[name](), reference.DiT_models[name]()
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def test_same_seed_same_init_as_reference():
    torch.manual_seed(3)
    ours = DiT(**TINY, backend="torch")
    torch.manual_seed(3)
    ref = reference.DiT(**TINY)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_loads_reference_checkpoint_strict_and_matches_outputs_and_grads():
    ref = _randomize(reference.DiT(**TINY)).eval()
    ours = DiT(**TINY, backend="torch").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    t, y = torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 3, 9])
    out_ref = ref(x, t, y)
    out = ours(x, t, y)
    assert_close(out, out_ref, atol=1e-5, rtol=1e-5, name="forward")
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(out_ref.square().sum(), [x, *(p for p in ref.parameters() if p.requires_grad)],
                                allow_unused=True)
    g = torch.autograd.grad(out.square().sum(), [x, *(p for _, p in trainable)], allow_unused=True)
    for (name, _), a, b in zip([("x", None), *trainable], g, g_ref):
        if b is None:
            assert a is None or not a.abs().sum(), name
        else:
            # fp32 conv vs Linear-on-tokens sum in different orders: error relative to the gradient's scale
            assert_close(a, b, atol=2e-5 * b.abs().max().item(), rtol=1e-4, name=f"grad {name}")
    xc = torch.randn(4, 4, 8, 8)
    tc, yc = torch.full((4,), 10.0), torch.tensor([1, 2, 10, 10])
    assert_close(ours.forward_with_cfg(xc, tc, yc, 4.0), ref.forward_with_cfg(xc, tc, yc, 4.0), atol=1e-5, rtol=1e-5)


def test_mixed_image_and_video_list_each_sample_independent():
    model = _randomize(DiT(**VIDEO, backend="torch")).eval()
    latents = [torch.randn(4, 3, 4, 6), torch.randn(4, 6, 2), torch.randn(4, 1, 2, 2), torch.randn(4, 2, 4, 4)]
    t = torch.tensor([3.0, 50.0, 700.0, 999.0])
    y = torch.tensor([1, 2, 3, 4])
    outs = model(latents, t, y)
    assert [o.shape for o in outs] == [x.shape for x in latents]
    for i, x in enumerate(latents):
        alone = model([x], t[i:i + 1], y[i:i + 1])[0]
        assert_close(outs[i], alone, atol=1e-5, rtol=1e-5, name=f"sample {i}")
    perm = [2, 0, 3, 1]
    permuted = model([latents[i] for i in perm], t[perm], y[perm])
    for j, i in enumerate(perm):
        assert_close(permuted[j], outs[i], atol=1e-5, rtol=1e-5)


def test_images_in_a_video_model_get_the_official_position_table():
    model = DiT(**VIDEO, backend="torch")
    _, seqs = packdit.pack([torch.zeros(4, 8, 8)], (1, 2, 2))
    emb = model._position_embedding(seqs, 32).float()
    assert_close(emb, model.pos_embed[0], atol=1e-7, rtol=0)


def test_per_frame_and_per_token_timesteps():
    model = _randomize(DiT(**VIDEO, backend="torch")).eval()
    latents = [torch.randn(4, 3, 2, 4), torch.randn(4, 2, 2)]
    tokens, seqs = packdit.pack(latents, (1, 2, 2))
    y = torch.tensor([1, 2])
    per_sample = model.forward_packed(tokens, seqs, torch.tensor([100.0, 200.0]), y)
    per_frame = model.forward_packed(tokens, seqs, torch.tensor([100.0, 100.0, 100.0, 200.0]), y)
    per_token = model.forward_packed(tokens, seqs, torch.tensor([100.0] * 6 + [200.0]), y)
    assert_close(per_frame, per_sample, atol=1e-5, rtol=1e-5)
    assert_close(per_token, per_sample, atol=1e-5, rtol=1e-5)
    # a different timestep on frame 2 changes frame 2's tokens (and, through attention, its sample)
    other = model.forward_packed(tokens, seqs, torch.tensor([100.0, 100.0, 900.0, 200.0]), y)
    assert not torch.allclose(other[4:6], per_sample[4:6])
    assert_close(other[6:], per_sample[6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per frame"):
        model.forward_packed(tokens, seqs, torch.zeros(5), y)


def test_text_conditioning_cross_attention_is_per_sample():
    model = _randomize(DiT(**VIDEO, cond="text", text_dim=12, backend="torch")).eval()
    assert "blocks.0.cross_attn.kv.weight" in model.state_dict() and not hasattr(model, "y_embedder")
    latents = [torch.randn(4, 2, 4, 4), torch.randn(4, 4, 6)]
    context = [torch.randn(5, 12), torch.randn(3, 12)]
    t = torch.tensor([10.0, 20.0])
    out = model(latents, t, context=context)
    changed = model(latents, t, context=[context[0], torch.randn(7, 12)])
    assert_close(changed[0], out[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[1], out[1])
    unconditional = model(latents, t, context=[torch.zeros(0, 12), context[1]])  # empty text: CFG null branch
    assert torch.isfinite(unconditional[0]).all()
    assert_close(unconditional[1], out[1], atol=1e-5, rtol=1e-5)


def test_factorized_positions_and_errors():
    model = _randomize(DiT(**VIDEO, pos_embed="factorized", max_grid=(4, 4, 4), backend="torch")).eval()
    y = torch.tensor([1])
    model([torch.randn(4, 2, 8, 8)], torch.tensor([5.0]), y)
    with pytest.raises(ValueError, match="exceeds max_grid"):
        model([torch.randn(4, 1, 10, 4)], torch.tensor([5.0]), y)
    fractional = _randomize(DiT(**VIDEO, pos_embed="factorized", max_grid=(4, 4, 4), fractional_positions=True,
                                backend="torch"))
    assert fractional([torch.randn(4, 1, 20, 4)], torch.tensor([5.0]), y)[0].shape == (4, 1, 20, 4)
    with pytest.raises(ValueError, match="pos_embed"):
        DiT(**VIDEO, pos_embed="learned")
    with pytest.raises(ValueError, match="text_dim"):
        DiT(**VIDEO, cond="text")


def test_qk_norm_and_activation_checkpointing_same_gradients():
    model = _randomize(DiT(**VIDEO, qk_norm=True, backend="torch"))
    assert "blocks.1.attn.q_norm.weight" in model.state_dict()
    latents = [torch.randn(4, 2, 4, 4), torch.randn(4, 2, 2)]
    t, y = torch.tensor([10.0, 20.0]), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model.checkpoint_activations = ckpt
        model.zero_grad()
        sum(o.square().sum() for o in model(latents, t, y)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_video_configs():
    with torch.device("meta"):
        st, big = DiT_models["STDiT-XL/2"](), DiT_models["DiT-3B"]()
    assert st.blocks[0].attn.head_dim == 72 and big.blocks[0].attn.head_dim == 128
    assert isinstance(st.x_embedder.proj, torch.nn.Conv3d)


def _grads(model, out):
    loss = sum(o.square().sum() for o in out) if isinstance(out, list) else out.square().sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("options", [
    dict(),
    dict(attention="spatial_temporal", qk_norm=True),
    dict(pos_embed="rope3d"),
    dict(cond="text", text_dim=12),
], ids=["full-sincos", "spatial-temporal-qknorm", "rope3d", "text"])
def test_triton_backend_matches_torch_backend(options):
    """The fused kernels (Triton interpreter on CPU) against the model's own reference path, fwd and bwd."""
    torch.manual_seed(0)
    ref = _randomize(DiT(**VIDEO, backend="torch", **options))
    fast = DiT(**VIDEO, backend="triton", **options)
    fast.load_state_dict(ref.state_dict())
    latents = [torch.randn(4, 2, 4, 6), torch.randn(4, 6, 2), torch.randn(4, 1, 2, 2)]
    t = torch.tensor([10.0, 500.0, 900.0])
    kwargs = dict(context=[torch.randn(3, 12), torch.randn(0, 12), torch.randn(5, 12)]) if "cond" in options else \
        dict(y=torch.tensor([1, 2, 3]))
    out_ref, out = ref(latents, t, **kwargs), fast(latents, t, **kwargs)
    for a, b in zip(out, out_ref):
        assert_close(a, b, atol=2e-4, rtol=2e-4, name="output")
    for name, a, b in zip([n for n, p in ref.named_parameters() if p.requires_grad],
                               _grads(fast, out), _grads(ref, out_ref)):
        if b is None:
            continue
        assert_close(a, b, atol=2e-4 * max(1.0, b.abs().max().item()), rtol=2e-3, name=f"grad {name}")


def test_triton_backend_compiles_without_recompiling_for_new_layouts():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _randomize(DiT(**VIDEO, backend="triton")).eval()
    counter = CompileCounter()
    step = torch.compile(model.forward_packed, backend=counter, fullgraph=True, dynamic=True)
    for shapes in ([(4, 2, 4, 6), (4, 6, 2)], [(4, 4, 4), (4, 1, 2, 6), (4, 2, 2, 2)], [(4, 2, 2), (4, 3, 2, 2)]):
        tokens, seqs = packdit.pack([torch.randn(s) for s in shapes], (1, 2, 2))
        t = torch.rand(len(shapes)) * 1000
        y = torch.arange(len(shapes))
        assert_close(step(tokens, seqs, t, y), model.forward_packed(tokens, seqs, t, y), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


def test_bf16_autocast_training_step_is_finite_and_close_to_fp32():
    model = _randomize(DiT(**VIDEO, backend="torch")).eval()  # eval: no random label dropout between the calls
    latents = [torch.randn(4, 2, 4, 4), torch.randn(4, 6, 2)]
    t, y = torch.tensor([10.0, 700.0]), torch.tensor([1, 2])
    want = model(latents, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(latents, t, y)
        loss = sum(o.float().square().mean() for o in got)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().max() <= 0.05 * b.abs().max()


def test_config_and_official_positional_arguments_build_the_same_model():
    config = DiTConfig(**TINY)
    torch.manual_seed(1)
    from_config = DiT(config)
    torch.manual_seed(1)
    positional = DiT(8, 2, 4, 32, 2, 2, 4.0, 0.1, 10, True)  # the official constructor's order
    assert from_config.config == positional.config == config
    for (k, a), b in zip(from_config.state_dict().items(), positional.state_dict().values()):
        assert torch.equal(a, b), k
    assert DiT(config, backend="torch").config == dataclasses.replace(config, backend="torch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 3
    with pytest.raises(TypeError, match="keywords"):
        DiT(config, 3)


def test_named_configs_are_the_registry():
    assert list(DiT_models) == list(DIT_CONFIGS)
    with torch.device("meta"):
        for name in ("DiT-XL/2", "DiT-S/8", "STDiT-XL/2", "DiT-3B"):
            assert DiT_models[name]().config == DIT_CONFIGS[name]
        smaller = DiT_models["DiT-3B"](hidden_size=64, num_heads=4, depth=1)
    assert smaller.rope == default_rope(16)  # the default RoPE follows the overridden head dim


@pytest.mark.parametrize("options, match", [
    (dict(fractional_positions=True), "fractional_positions: given"),
    (dict(max_grid=(4, 4, 4)), "max_grid: given"),
    (dict(pos_embed="rope3d", max_grid=(4, 4, 4)), "max_grid: given"),
    (dict(text_dim=12), "text_dim: given"),
    (dict(rope=RoPE3D(axes_dims=(4, 4, 4))), "rope: given"),
    (dict(pos_embed="rope3d", rope=RoPE3D(axes_dims=(8, 8, 8))), "rope: axes_dims"),
    (dict(pos_embed="factorized", max_grid=(4, 0, 4)), "max_grid: expected three positive"),
    (dict(backend="cuda"), "backend: expected one of"),
    (dict(hidden_size=33), "not divisible"),
    (dict(patch_size=(1, 2, 2, 2)), "patch_size"),
    (dict(attention="diagonal"), "attention: expected one of"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_config_refuses_options_it_would_ignore(options, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**VIDEO, **options})


def test_only_sincos2d_stores_a_pos_embed_table():
    for pos_embed, stored in (("sincos2d", True), ("factorized", False), ("rope3d", False)):
        assert ("pos_embed" in DiT(**VIDEO, pos_embed=pos_embed).state_dict()) == stored, pos_embed
