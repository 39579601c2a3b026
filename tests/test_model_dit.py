"""packdit.DiT: official compatibility via the reference, packed equivalences, video/NaViT options, DiTConfig."""

import dataclasses

import official_dit
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
    (dict(hidden_size=34), r"hidden_size: pos_embed='sincos2d' needs a multiple of 4 .*, got 34"),
    (dict(attention="spatial_temporal", patch_size=2), r"attention: 'spatial_temporal' .* 2-D patch_size 2"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_config_refuses_options_it_would_ignore(options, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**VIDEO, **options})


def test_only_sincos2d_stores_a_pos_embed_table():
    for pos_embed, stored in (("sincos2d", True), ("factorized", False), ("rope3d", False)):
        assert ("pos_embed" in DiT(**VIDEO, pos_embed=pos_embed).state_dict()) == stored, pos_embed


# ---------------------------------------------------------------------- what the configuration cannot honour
def test_an_image_model_refuses_videos():
    """2-D patches embed no time: a video's frames would silently share every position embedding."""
    model = DiT(**TINY, backend="torch").eval()
    t, y = torch.tensor([1.0, 2.0]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"seqs: sample 1 has T=2 patch frames, but this DiT has the 2-D "
                                         r"patch_size 2 of an image model"):
        model([torch.randn(4, 4, 4), torch.randn(4, 2, 4, 4)], t, y)
    with pytest.raises(ValueError, match="T=3 patch frames"):
        model(torch.randn(2, 4, 3, 4, 4), t, y)
    single_frame = model([torch.randn(4, 1, 4, 4)], t[:1], y[:1])  # one frame is an image
    assert single_frame[0].shape == (8, 1, 4, 4)


def test_conditioning_the_configuration_has_no_use_for_is_refused():
    latents, t = [torch.randn(4, 2, 4)], torch.tensor([3.0])
    by_class = DiT(**VIDEO, backend="torch")
    with pytest.raises(ValueError, match=r"context: given, but this DiT is class-conditioned \(cond='class'\)"):
        by_class(latents, t, torch.tensor([1]), context=[torch.randn(3, 12)])
    by_text = DiT(**VIDEO, cond="text", text_dim=12, backend="torch")
    with pytest.raises(ValueError, match=r"y: given, but this DiT is text-conditioned \(cond='text'\)"):
        by_text(latents, t, torch.tensor([1]), context=[torch.randn(3, 12)])


@pytest.mark.parametrize("model_class", [DiT, reference.DiT])
def test_a_loaded_pos_embed_must_be_the_fixed_table_the_model_computes(model_class):
    """The position embedding is computed from token positions, so a learned or interpolated table in a
    checkpoint would be ignored: loading refuses it, strict or not. Official checkpoints (the numpy table),
    and the table rounded to half precision, load."""
    model = model_class(**TINY)
    official = official_dit.DiT(**TINY).state_dict()
    model.load_state_dict(official, strict=True)
    for dtype in (torch.float16, torch.bfloat16):
        model.load_state_dict({**official, "pos_embed": official["pos_embed"].to(dtype)})
    altered = {**official, "pos_embed": official["pos_embed"] * 1.01}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"pos_embed: the loaded table differs from the fixed 2-D sin-cos "
                                               r"table .* by up to 0.01"):
            model.load_state_dict(altered, strict=strict)


# ---------------------------------------------------------------------- errors that name the argument
@pytest.mark.parametrize("model_class", [DiT, reference.DiT], ids=["packdit", "reference"])
def test_class_labels_are_checked_before_the_embedding(model_class):
    """On a GPU an out-of-range label is a device-side assert; it is refused on the host while checks are on."""
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0])
    model = model_class(**TINY).eval()  # 10 classes and, with class_dropout_prob 0.1, the null class 10
    model(x, t, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, 10\] \(10 is the null class of "
                                         r"classifier-free guidance\), got values from -1 to 3"):
        model(x, t, torch.tensor([3, -1]))
    without_null = model_class(**{**TINY, "class_dropout_prob": 0.0}).eval()
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, 9\] \(no null class: "
                                         r"class_dropout_prob=0\), got values from 3 to 10"):
        without_null(x, t, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"force_drop_ids / dropout_prob: dropping a label needs the null class 10"):
        without_null.y_embedder(torch.tensor([3]), False, force_drop_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"y: expected integer class labels \(int64 or int32\), got torch.float32"):
        model(x, t, torch.tensor([3.0, 1.0]))
    with packdit.checks(False), pytest.raises(IndexError):  # unchecked: no host read of the labels
        model(x, t, torch.tensor([3, 11]))


@pytest.mark.parametrize("model_class", [DiT, reference.DiT], ids=["packdit", "reference"])
def test_timesteps_and_guidance_arguments_are_named(model_class):
    model = model_class(**TINY).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"t: expected a 1-D tensor of timesteps .*, got 0.5"):
        model(x, 0.5, y)
    with pytest.raises(ValueError, match=r"x: forward_with_cfg expects an even batch.* got 3 rows"):
        model.forward_with_cfg(torch.randn(3, 4, 8, 8), torch.ones(3), torch.tensor([1, 2, 10]), 4.0)
    with pytest.raises(ValueError, match=r"cfg_scale: expected a finite number, got nan"):
        model.forward_with_cfg(torch.randn(2, 4, 8, 8), torch.ones(2), torch.tensor([1, 10]), float("nan"))


def test_text_context_errors_name_the_argument():
    model = DiT(**VIDEO, cond="text", text_dim=12, backend="torch").eval()
    latents, t = [torch.randn(4, 2, 4), torch.randn(4, 2, 2)], torch.tensor([3.0, 4.0])
    packed_ctx, ctx_seqs = torch.randn(5, 12), packdit.PackedSeqs.from_grids([(1, 1, 2), (1, 1, 3)])
    for context, match in [
        ([], r"context: expected 2 text sequences \(L_b, text_dim=12\), one per sample, got 0"),
        ([torch.randn(3, 12)], r"context: expected 2 text sequences .* got 1"),
        (torch.randn(2, 3, 12), r"context: expected a list of 2 \(L_b, text_dim=12\) tensors or a packed"),
        ([torch.randn(3, 12), torch.randn(3)], r"context\[1\]: expected \(L_b, text_dim=12\), got \(3,\)"),
        ([torch.randn(3, 12), torch.randn(3, 10)], r"context\[1\]: expected \(L_b, text_dim=12\), got \(3, 10\)"),
        ((packed_ctx[:, :10], ctx_seqs), r"context\[0\]: expected \(5, 12\) text tokens of context\[1\], got "
                                         r"\(5, 10\)"),
        ((packed_ctx, packdit.PackedSeqs.from_grids([(1, 1, 5)])), r"context\[1\]: expected a layout of 2 text "
                                                                    r"sequences, one per sample, got 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(latents, t, context=context)
    model(latents, t, context=(packed_ctx, ctx_seqs))


@pytest.mark.parametrize("options, match", [
    (dict(cond="text", text_dim=-3), r"text_dim: expected a positive int for cond='text' .*, got -3"),
    (dict(cond="text", text_dim=12.5), r"text_dim: expected a positive int for cond='text' .*, got 12.5"),
    (dict(depth=2.5), r"depth: expected a non-negative int, got 2.5"),
    (dict(hidden_size=32.0), r"hidden_size: expected a positive int, got 32.0"),
    (dict(num_classes=0), r"num_classes: expected a positive int, got 0"),
    (dict(class_dropout_prob=1.5), r"class_dropout_prob: expected a probability in \[0, 1\], got 1.5"),
    (dict(class_dropout_prob=float("nan")), r"class_dropout_prob: expected a probability in \[0, 1\], got nan"),
    (dict(mlp_ratio=0), r"mlp_ratio: expected a finite number > 0, got 0"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_config_names_ill_typed_fields(options, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**{**VIDEO, **options})
