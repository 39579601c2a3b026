"""packdit.diffusion: flow matching and its samplers, the official DDPM path, on batches and packed batches."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, randomize_

from packdit import PackedSeqs, pack, pack_like
from packdit.diffusion import (
    FlowMatching,
    GaussianDiffusion,
    classifier_free_guidance,
    create_diffusion,
    dit_adapter,
    draw_noise,
    flow_schedule,
    frame_timesteps,
    get_named_beta_schedule,
    sample,
    sample_timesteps,
    shift_timesteps,
    space_timesteps,
)
from packdit.reference import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
NULL = TINY["num_classes"]
PATCH = (1, 2, 2)


def tiny_dit(learn_sigma: bool, seed: int = 0, randomize: bool = True) -> DiT:
    """A tiny DiT; ``randomize`` overwrites every trainable parameter with N(0, 0.1) so the zero-initialised
    adaLN / final layers act. Its own label dropout is off (the objective drops labels)."""
    torch.manual_seed(seed)
    model = DiT(**TINY, learn_sigma=learn_sigma)
    model.y_embedder.dropout_prob = 0.0
    if randomize:
        randomize_(model, seed)
    return model.eval()


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ====================================================================== flow: timesteps
@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_statistics(mean, std):
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0), mean=mean, std=std)
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - mean) < 0.03 and abs(logit.std().item() - std) < 0.03
    if mean == 0.0:
        assert abs(t.double().median().item() - 0.5) < 0.01   # symmetric around 1/2
    again = sample_timesteps(20000, generator=torch.Generator().manual_seed(0), mean=mean, std=std)
    assert torch.equal(t, again)


def test_shift_is_per_sample_monotone_and_keeps_endpoints():
    u = torch.tensor([0.3, 0.3, 0.3, 0.3])
    tokens = torch.tensor([64, 256, 1024, 10**6])
    shifted = shift_timesteps(u, tokens)
    s = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)          # sqrt(L / 256), clamped at 4
    assert_close(shifted, (s * 0.3 / (1 + (s - 1) * 0.3)).float(), atol=1e-7, rtol=0, name="formula")
    assert shifted[0] < shifted[1] == u[1] < shifted[2] < shifted[3]    # more tokens -> more noise
    grid = torch.linspace(0, 1, 101)
    for n in (16, 256, 5000):
        out = shift_timesteps(grid, torch.tensor(n))
        assert out[0] == 0.0 and out[-1] == 1.0
        assert bool((out[1:] > out[:-1]).all())


def test_training_timesteps_shift_by_full_resolution():
    flow = FlowMatching()
    latents = [randn(4, 8, 8, seed=1), randn(4, 16, 16, seed=2)]
    _, dense = pack(latents, PATCH)
    _, dropped = pack(latents, PATCH, drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    t_dense = flow.sample_timesteps(dense, torch.Generator().manual_seed(3))
    t_dropped = flow.sample_timesteps(dropped, torch.Generator().manual_seed(3))
    assert torch.equal(t_dense, t_dropped)                               # dropping does not change resolution
    u = sample_timesteps(2, generator=torch.Generator().manual_seed(3))
    assert_close(t_dense, shift_timesteps(u, torch.tensor([16, 64])), atol=0, rtol=0, name="shifted")
    assert torch.equal(FlowMatching(shift=False).sample_timesteps(dense, torch.Generator().manual_seed(3)), u)


# ====================================================================== flow: training loss
def _loss_of_one(model_fn, x0: torch.Tensor, noise: torch.Tensor, t: float, y: int, kept=None) -> torch.Tensor:
    """The loss of one sample on its own (optionally only on the raster tokens ``kept``)."""
    x0_tokens, seqs = pack([x0], PATCH)
    noise_tokens, _ = pack([noise], PATCH)
    if kept is not None:
        seqs = PackedSeqs.from_grids(seqs.grids, kept=[kept], sample_ndims=[x0.dim()])
        x0_tokens, noise_tokens = x0_tokens[kept], noise_tokens[kept]
    x_t = (1 - t) * x0_tokens + t * noise_tokens
    pred = model_fn(x_t, seqs, torch.tensor([t]), torch.tensor([y]))
    return (pred - (noise_tokens - x0_tokens)).square().mean()


def test_loss_is_normalised_per_sample():
    model_fn = dit_adapter(tiny_dit(learn_sigma=False))
    short, long = randn(4, 4, 4, seed=1), randn(4, 8, 12, seed=2)
    n_short, n_long = randn(4, 4, 4, seed=3), randn(4, 8, 12, seed=4)
    t, y = torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    flow = FlowMatching()
    with torch.no_grad():
        loss, details = flow.training_loss(model_fn, [short, long], patch_size=PATCH, t=t, y=y, noise=[n_short, n_long])
        alone = torch.stack([_loss_of_one(model_fn, short, n_short, 0.3, 1),
                             _loss_of_one(model_fn, long, n_long, 0.7, 2)])
        assert_close(details["per_sample"], alone, atol=1e-5, rtol=1e-5, name="per-sample loop")
        assert_close(loss, alone.mean(), atol=1e-5, rtol=1e-5, name="loss")
        token_weighted = (alone * torch.tensor([4.0, 24.0])).sum() / 28
        assert abs(loss - token_weighted) > 1e-3 * loss                  # the check above can tell them apart
        # a duplicated long sample weighs what a duplicated short one does: 1/3 each
        three, _ = flow.training_loss(model_fn, [short, long, long], patch_size=PATCH, t=torch.tensor([0.3, 0.7, 0.7]),
                                      y=torch.tensor([1, 2, 2]), noise=[n_short, n_long, n_long])
        assert_close(three, (alone[0] + 2 * alone[1]) / 3, atol=1e-5, rtol=1e-5, name="duplicated long")


def test_loss_on_kept_tokens_of_a_dropped_layout():
    model_fn = dit_adapter(tiny_dit(learn_sigma=False))
    latents = [randn(4, 8, 8, seed=1), randn(4, 6, 10, seed=2), randn(4, 2, 2, seed=3)]
    noise = [randn(*x.shape, seed=10 + b) for b, x in enumerate(latents)]
    t, y = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 3, 1])
    with torch.no_grad():
        loss, details = FlowMatching().training_loss(
            model_fn, latents, patch_size=PATCH, t=t, y=y, noise=noise, drop_rate=0.5,
            generator=torch.Generator().manual_seed(0))
        seqs = details["seqs"]
        assert seqs.dropped and seqs.seqlens == (8, 8, 1)
        kept = seqs.raster_index().split(list(seqs.seqlens))
        alone = torch.stack([_loss_of_one(model_fn, x, n, float(tb), int(yb), k)
                             for x, n, tb, yb, k in zip(latents, noise, t, y, kept)])
    assert_close(details["per_sample"], alone, atol=1e-5, rtol=1e-5, name="kept tokens")
    assert_close(loss, alone.mean(), atol=1e-5, rtol=1e-5, name="loss")


def test_cfg_label_dropout_is_per_sample_and_reproducible():
    seen = []

    def model_fn(x, seqs, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)

    latents = [randn(4, 2, 2, seed=b) for b in range(64)]
    y = torch.arange(64) % 4
    flow = FlowMatching()
    for _ in range(2):
        _, details = flow.training_loss(model_fn, latents, patch_size=PATCH, y=y, cfg_dropout=0.5, null_label=NULL,
                                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(seen[0], seen[1]) and torch.equal(details["y"], seen[1])
    dropped = seen[0] == NULL
    assert 16 <= int(dropped.sum()) <= 48
    assert torch.equal(seen[0][~dropped], y[~dropped])
    flow.training_loss(model_fn, latents, patch_size=PATCH, y=y, cfg_dropout=0.5, null_label=NULL,
                       generator=torch.Generator().manual_seed(8))
    assert not torch.equal(seen[2], seen[0])
    flow.training_loss(model_fn, latents, patch_size=PATCH, y=y, cfg_dropout=1.0, null_label=NULL)
    assert bool((seen[3] == NULL).all())
    with pytest.raises(ValueError, match="null_label"):
        flow.training_loss(model_fn, latents, patch_size=PATCH, y=y, cfg_dropout=0.1)


def test_per_token_timesteps_for_per_frame_noise():
    """Image-to-video: frame 0 clean (t = 0), later frames noisier; the model gets the per-token t."""
    seen = {}

    def model_fn(x, seqs, t, y):
        seen.update(x_t=x, t=t)
        return x * 0.5

    video, image = randn(4, 3, 4, 4, seed=1), randn(4, 4, 4, seed=2)
    noise = [randn(4, 3, 4, 4, seed=3), randn(4, 4, 4, seed=4)]
    t_frames = [torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.25])]
    flow = FlowMatching()
    loss, details = flow.training_loss(model_fn, [video, image], patch_size=PATCH, noise=noise,
                                       t=lambda seqs: frame_timesteps(t_frames, seqs))
    x0, seqs = pack([video, image], PATCH)
    eps = pack_like(noise, seqs, PATCH)
    t_tokens = torch.tensor([0.0] * 4 + [0.5] * 4 + [1.0] * 4 + [0.25] * 4)
    assert torch.equal(details["t"], t_tokens) and torch.equal(seen["t"], t_tokens)
    assert torch.equal(seen["x_t"][:4], x0[:4])                           # the clean conditioning frame
    assert torch.equal(seen["x_t"][8:12], eps[8:12])                      # the pure-noise frame
    # a per-token t that is constant within each sample is the per-sample t
    same, _ = flow.training_loss(model_fn, [video, image], patch_size=PATCH, noise=noise, t=torch.tensor([0.5, 0.25]))
    per_token, _ = flow.training_loss(model_fn, [video, image], patch_size=PATCH, noise=noise,
                                      t=torch.tensor([0.5] * 12 + [0.25] * 4))
    assert_close(per_token, same, atol=1e-7, rtol=1e-7, name="per-token == per-sample")
    with pytest.raises(ValueError, match="per token"):
        flow.training_loss(model_fn, [video, image], patch_size=PATCH, noise=noise, t=torch.ones(5))


def test_training_reduces_loss_on_fixed_data():
    model = tiny_dit(learn_sigma=False, randomize=False).train()
    model_fn = dit_adapter(model)
    latents = [randn(4, 8, 8, seed=1), randn(4, 4, 12, seed=2), randn(4, 6, 6, seed=3)]
    y = torch.tensor([0, 1, 2])
    flow = FlowMatching()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = flow.training_loss(model_fn, latents, patch_size=PATCH, y=y, cfg_dropout=0.1, null_label=NULL,
                                     generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ====================================================================== flow: samplers
MIXED_SHAPES = [(4, 8, 8), (4, 3, 4, 6), (4, 2, 2), (4, 1, 6, 4)]   # images (C, H, W) and videos (C, T, H, W)


def _targets(shapes):
    return [randn(*s, seed=100 + b) for b, s in enumerate(shapes)]


def _point_mass_velocity(targets):
    """x0 = target exactly: x_t = (1 - t) x0 + t n gives n = (x_t - (1 - t) x0) / t, so v = n - x0 = (x_t - x0) / t."""
    def model_fn(x, seqs, t, y):
        x0, _ = pack(targets, PATCH)
        return (x - x0) / t[seqs.segment_ids.long()][:, None]
    return model_fn


def _gaussian_velocity(means, sigma):
    """x0 ~ N(mu, sigma^2) elementwise. With a = 1 - t, x_t ~ N(a mu, V), V = a^2 sigma^2 + t^2, and
    v(x, t) = E[n - x0 | x_t = x] = (t - a sigma^2) / V * (x - a mu) - mu. The flow maps the noise n at
    t = 1 to exactly mu + sigma n at t = 0."""
    def model_fn(x, seqs, t, y):
        mu, _ = pack(means, PATCH)
        t_tok = t[seqs.segment_ids.long()][:, None].double()
        a = 1 - t_tok
        var = a**2 * sigma**2 + t_tok**2
        return ((t_tok - a * sigma**2) / var * (x.double() - a * mu) - mu).float()
    return model_fn


def test_euler_with_exact_velocity_recovers_point_mass_and_shapes():
    targets = _targets(MIXED_SHAPES)
    seen_t = []
    exact = _point_mass_velocity(targets)

    def model_fn(x, seqs, t, y):
        seen_t.append(t)
        return exact(x, seqs, t, y)

    out = sample(model_fn, MIXED_SHAPES, patch_size=PATCH, steps=4, base_tokens=4,
                 generator=torch.Generator().manual_seed(0))
    assert [tuple(o.shape) for o in out] == MIXED_SHAPES
    for o, target in zip(out, targets):
        assert_close(o, target, atol=1e-5, rtol=1e-5, name="point mass")
    # per-sample schedules: 16, 18, 1 and 6 tokens (shift factors 2, 2.1, 0.5, 1.2) get different t at a step
    assert seen_t[1].shape == (4,) and len(set(seen_t[1].tolist())) == 4
    assert bool((seen_t[0] == 1).all())


def test_heun_beats_euler_on_gaussian_target():
    shapes = [(4, 8, 8), (4, 2, 4, 4)]
    means, sigma = _targets(shapes), 0.7
    noise = draw_noise(shapes, torch.Generator().manual_seed(0))
    exact = [m + sigma * n for m, n in zip(means, noise)]
    model_fn = _gaussian_velocity(means, sigma)

    def error(method, steps):
        out = sample(model_fn, shapes, patch_size=PATCH, steps=steps, method=method, noise=noise)
        return max((o - e).abs().max().item() for o, e in zip(out, exact))

    euler16, euler32, heun16, heun32 = error("euler", 16), error("euler", 32), error("heun", 16), error("heun", 32)
    assert heun16 < 0.2 * euler16, (heun16, euler16)
    assert 1.5 < euler16 / euler32 < 2.5, (euler16, euler32)              # first order: twice the steps, half the error
    assert heun16 / heun32 > 3.0, (heun16, heun32)                        # second order: a quarter
    assert heun32 < 1e-2


def test_sampling_is_deterministic_with_a_seed():
    model_fn = dit_adapter(tiny_dit(learn_sigma=True))
    shapes, y = [(4, 8, 8), (4, 4, 6)], torch.tensor([1, 3])

    def run(seed, method="heun"):
        return sample(model_fn, shapes, patch_size=PATCH, y=y, steps=3, cfg_scale=2.0, null_label=NULL, method=method,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, w) for u, w in zip(a, c))
    # one generator per sample: a sample does not depend on what else is in its batch
    alone = sample(model_fn, shapes[1:], patch_size=PATCH, y=y[1:], steps=3,
                   generator=[torch.Generator().manual_seed(5)])
    both = sample(model_fn, shapes, patch_size=PATCH, y=y, steps=3,
                  generator=[torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)])
    assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5, name="per-sample generator")


def test_cfg_in_one_sequence_equals_separate_calls():
    model_fn = dit_adapter(tiny_dit(learn_sigma=False))
    shapes, y, scale = [(4, 8, 8), (4, 6, 4)], torch.tensor([2, 0]), 3.0
    calls = []

    def counted(x, seqs, t, y_):
        calls.append(len(seqs))
        return model_fn(x, seqs, t, y_)

    def separate(x, seqs, t, y_):
        cond = model_fn(x, seqs, t, y_)
        uncond = model_fn(x, seqs, t, torch.full_like(y_, NULL))
        return uncond + scale * (cond - uncond)

    noise = draw_noise(shapes, torch.Generator().manual_seed(0))
    packed = sample(counted, shapes, patch_size=PATCH, y=y, steps=3, cfg_scale=scale, null_label=NULL, noise=noise)
    reference = sample(separate, shapes, patch_size=PATCH, y=y, steps=3, noise=noise)
    assert calls == [4, 4, 4]                                             # one call of 2B samples per step
    for p, r in zip(packed, reference):
        assert_close(p, r, atol=1e-5, rtol=1e-5, name="cfg")
    x, seqs = pack(noise, PATCH)
    guided = classifier_free_guidance(model_fn, cfg_scale=scale, null_label=NULL, guided_columns=4)
    out, full = guided(x, seqs, torch.tensor([0.5, 0.2]), y), model_fn(x, seqs, torch.tensor([0.5, 0.2]), y)
    assert_close(out[:, 4:], full[:, 4:], atol=1e-6, rtol=1e-6, name="unguided columns are conditional")


def test_flow_schedule_rows():
    schedule = flow_schedule(torch.tensor([64, 256, 4096]), 5)
    assert schedule.shape == (3, 6) and schedule.dtype == torch.float64
    assert bool((schedule[:, 0] == 1).all() and (schedule[:, -1] == 0).all())
    assert bool((schedule[:, 1:] < schedule[:, :-1]).all())
    assert_close(schedule[1], torch.linspace(1, 0, 6, dtype=torch.float64), atol=1e-15, rtol=0, name="identity at 256")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_shift=0), r"max_shift .*: expected a finite number >= 1, got 0"),
    (dict(max_shift=-2.0), r"max_shift .*: expected a finite number >= 1, got -2.0"),
    (dict(max_shift=0.5), r"max_shift .*: expected a finite number >= 1, got 0.5"),
    (dict(max_shift=NAN), r"max_shift .*: expected a finite number >= 1, got nan"),
    (dict(max_shift=INF), r"max_shift .*: expected a finite number >= 1, got inf"),
    (dict(base_tokens=0), r"base_tokens: expected a finite number > 0, got 0"),
    (dict(base_tokens=NAN), r"base_tokens: expected a finite number > 0, got nan"),
    (dict(steps=2.5), r"steps: expected an int >= 1, got 2.5"),
    (dict(steps="10"), r"steps: expected an int >= 1, got '10'"),
    (dict(steps=True), r"steps: expected an int >= 1, got True"),
    (dict(steps=0), r"steps: expected an int >= 1, got 0"),
    (dict(num_tokens=torch.tensor([64, -1])), r"num_tokens: expected counts >= 0, got -1 for sample 1"),
    (dict(num_tokens=torch.tensor([NAN])), r"num_tokens: expected counts >= 0, got nan for sample 0"),
    (dict(num_tokens=torch.tensor([[64]])),
     r"num_tokens: expected a \(B,\) tensor of token counts, got shape \(1, 1\)"),
    (dict(num_tokens=[64, 256]), r"num_tokens: expected a \(B,\) tensor of token counts, got list"),
])
def test_flow_schedule_refuses_invalid_settings(kwargs, match):
    kwargs = dict(num_tokens=torch.tensor([64, 4096]), steps=4) | kwargs
    with pytest.raises(ValueError, match=match):
        flow_schedule(kwargs.pop("num_tokens"), kwargs.pop("steps"), **kwargs)


def test_flow_settings_are_checked_where_they_enter():
    with pytest.raises(ValueError, match=r"max_shift .*: expected a finite number >= 1, got 0"):
        FlowMatching(max_shift=0)
    with pytest.raises(ValueError, match=r"logit_std: expected a finite number >= 0, got nan"):
        FlowMatching(logit_std=NAN)
    with pytest.raises(ValueError, match=r"max_shift .*: expected a finite number >= 1, got 0"):
        shift_timesteps(torch.tensor([0.5]), torch.tensor([64]), max_shift=0)
    with pytest.raises(ValueError, match=r"mean: expected a finite number, got nan"):
        sample_timesteps(3, mean=NAN)
    with pytest.raises(ValueError, match=r"steps: expected an int >= 1, got 2.5"):
        sample(lambda x, seqs, t, y: x, [(4, 4, 4)], patch_size=PATCH, steps=2.5)


@pytest.mark.parametrize("scale", [NAN, INF, -INF])
def test_non_finite_guidance_scale_raises(scale):
    model_fn = dit_adapter(tiny_dit(learn_sigma=False))
    with pytest.raises(ValueError, match=r"cfg_scale: expected a finite number, got"):
        sample(model_fn, [(4, 4, 4)], patch_size=PATCH, y=torch.tensor([1]), steps=2, cfg_scale=scale,
               null_label=NULL)
    with pytest.raises(ValueError, match=r"cfg_scale: expected a finite number, got"):
        create_diffusion("2").p_sample_loop_packed(dit_adapter(tiny_dit(learn_sigma=True), time_scale=1.0,
                                                               keep_variance=True), [(4, 4, 4)], patch_size=PATCH,
                                                   y=torch.tensor([1]), cfg_scale=scale, null_label=NULL)
    with pytest.raises(ValueError, match=r"time_scale: expected a finite number > 0, got"):
        dit_adapter(tiny_dit(learn_sigma=False), time_scale=scale)


@pytest.mark.parametrize("null_label, match", [
    (NULL + 1, r"null_label: expected an int >= 0 < 5 \(the model's label table\), got 5"),
    (-1, r"null_label: expected an int >= 0 < 5 .*got -1"),
    (float(NULL), r"null_label: expected an int >= 0 < 5 .*got 4.0"),
])
def test_null_label_outside_the_label_table_raises(null_label, match):
    model_fn = dit_adapter(tiny_dit(learn_sigma=False))
    assert model_fn.num_labels == NULL + 1  # the classes and the null class
    with pytest.raises(ValueError, match=match):
        sample(model_fn, [(4, 4, 4)], patch_size=PATCH, y=torch.tensor([1]), steps=2, cfg_scale=2.0,
               null_label=null_label)
    with pytest.raises(ValueError, match=match):
        FlowMatching().training_loss(model_fn, [randn(4, 4, 4, seed=0)], patch_size=PATCH, y=torch.tensor([1]),
                                     cfg_dropout=0.5, null_label=null_label)
    with pytest.raises(ValueError, match=r"null_label: expected an int >= 0, got -1"):  # no table declared
        classifier_free_guidance(lambda x, seqs, t, y: x, cfg_scale=2.0, null_label=-1)


def test_training_loss_refuses_python_float_t_and_bad_cfg_dropout():
    model_fn = dit_adapter(tiny_dit(learn_sigma=False))
    latents, y = [randn(4, 4, 4, seed=0), randn(4, 4, 6, seed=1)], torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"t: expected a floating \(2,\) or \(10,\) tensor of times.*got float"):
        FlowMatching().training_loss(model_fn, latents, patch_size=PATCH, t=0.5)
    with pytest.raises(ValueError, match=r"t: expected a floating .*got dtype torch.int64"):
        FlowMatching().training_loss(model_fn, latents, patch_size=PATCH, t=torch.tensor([0, 1]))
    for bad in (NAN, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"cfg_dropout: expected"):
            FlowMatching().training_loss(model_fn, latents, patch_size=PATCH, y=y, cfg_dropout=bad, null_label=NULL)


def test_labels_and_noise_of_the_wrong_shape_raise_on_every_path():
    flow_fn = dit_adapter(tiny_dit(learn_sigma=False))
    ddpm_fn = dit_adapter(tiny_dit(learn_sigma=True), time_scale=1.0, keep_variance=True)
    diffusion, shapes, latents = create_diffusion("2"), [(4, 4, 4), (4, 4, 6)], [randn(4, 4, 4, seed=0)] * 2
    for y, got in [(torch.tensor([1]), r"shape \(1,\)"), (torch.tensor([[1, 2]]), r"shape \(1, 2\)"), ([1, 2], "list")]:
        match = rf"y: expected \(2,\) labels, one per sample, got {got}"
        with pytest.raises(ValueError, match=match):
            sample(flow_fn, shapes, patch_size=PATCH, y=y, steps=1)
        with pytest.raises(ValueError, match=match):
            diffusion.p_sample_loop_packed(ddpm_fn, shapes, patch_size=PATCH, y=y)
        with pytest.raises(ValueError, match=match):
            FlowMatching().training_loss(flow_fn, latents, patch_size=PATCH, y=y)
        with pytest.raises(ValueError, match=match):
            diffusion.training_losses_packed(ddpm_fn, latents, torch.tensor([0, 1]), patch_size=PATCH, y=y)
    with pytest.raises(ValueError, match=r"noise: expected shapes \[\(4, 4, 4\), \(4, 4, 6\)\], got"):
        diffusion.p_sample_loop_packed(ddpm_fn, shapes, patch_size=PATCH, y=torch.tensor([1, 2]),
                                       noise=[randn(4, 4, 4, seed=0)] * 2)


# ====================================================================== gaussian (official DDPM)
def test_linear_schedule_matches_official_formulas():
    betas = get_named_beta_schedule("linear", 1000)
    assert torch.equal(betas, torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64)))
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    assert_close(betas[500], torch.tensor(1e-4 + 500 * (0.02 - 1e-4) / 999, dtype=torch.float64), atol=0, rtol=1e-14)
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000 and torch.equal(diffusion.timestep_map, torch.arange(1000))
    beta = betas.tolist()
    for i in (0, 1, 499, 999):
        abar = math.prod(1 - b for b in beta[: i + 1])
        abar_prev = math.prod(1 - b for b in beta[:i])
        assert_close(diffusion.alphas_cumprod[i], torch.tensor(abar, dtype=torch.float64), atol=0, rtol=1e-12)
        assert_close(diffusion.betas[i], betas[i], atol=0, rtol=1e-9)
        posterior = beta[i] * (1 - abar_prev) / (1 - abar)
        assert_close(diffusion.posterior_variance[i], torch.tensor(posterior, dtype=torch.float64), atol=0, rtol=1e-9)
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]
    assert get_named_beta_schedule("linear", 500)[0] == 2e-4                 # scaled by 1000 / T


def test_respacing_matches_official_sets():
    steps250 = space_timesteps(1000, "250")
    assert len(steps250) == 250 and {0, 4, 8, 12, 16, 999} <= steps250
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "10") == set(range(0, 1000, 111))
    # stride 999/24 = 41.625; the 4th step is round(166.5) = 166 (round half to even, as the official code)
    assert sorted(space_timesteps(1000, "25"))[:5] == [0, 42, 83, 125, 166]
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    assert min(x for x in space_timesteps(300, "10,15,20") if x >= 100) == 100
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
    spaced = create_diffusion("250")
    base = create_diffusion("")
    kept = spaced.timestep_map
    assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], atol=0, rtol=1e-12, name="abar on kept steps")


def test_learned_range_step_matches_formulas():
    diffusion = create_diffusion("10")
    x = randn(2, 4, 4, 4, seed=1)
    eps, v = randn(2, 4, 4, 4, seed=2), torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    t = torch.tensor([9, 3])
    dist = diffusion.output_distribution(torch.cat([eps, v], 1), x, t, clip_denoised=True)
    for b, i in enumerate(t.tolist()):
        abar, abar_prev = diffusion.alphas_cumprod[i].item(), diffusion.alphas_cumprod_prev[i].item()
        beta = 1 - abar / abar_prev
        beta_tilde = beta * (1 - abar_prev) / (1 - abar)
        x0 = (x[b].double() / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps[b].double()).clamp(-1, 1)
        mean = beta * math.sqrt(abar_prev) / (1 - abar) * x0 + (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar) * x[b]
        frac = (v[b].double() + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
        assert_close(dist["pred_xstart"][b], x0, atol=1e-5, rtol=1e-5, name="x0")
        assert_close(dist["mean"][b], mean, atol=1e-5, rtol=1e-5, name="mean")
        assert_close(dist["log_variance"][b], log_var, atol=1e-5, rtol=1e-5, name="log variance")


def test_p_sample_loop_with_forward_with_cfg_like_official_sample_py():
    model = tiny_dit(learn_sigma=True)
    diffusion = create_diffusion("5")

    def run():
        torch.manual_seed(0)
        z = torch.randn(2, 4, 8, 8)
        z = torch.cat([z, z], 0)
        y = torch.cat([torch.tensor([1, 3]), torch.tensor([NULL] * 2)], 0)
        samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=True,
                                          model_kwargs=dict(y=y, cfg_scale=4.0), device="cpu")
        return samples.chunk(2, dim=0)[0]

    a, b = run(), run()
    assert a.shape == (2, 4, 8, 8) and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)


def test_packed_ddpm_sampling_equals_per_size_batches():
    """Mixed sizes packed in one sequence == the official CFG batch path per size, with per-sample generators."""
    model = tiny_dit(learn_sigma=True)
    diffusion = create_diffusion("4")
    shapes, labels, scale = [(4, 8, 8), (4, 8, 12), (4, 8, 8)], torch.tensor([1, 2, 3]), 4.0

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    packed = diffusion.p_sample_loop_packed(
        dit_adapter(model, time_scale=1.0, keep_variance=True), shapes, patch_size=PATCH, y=labels,
        cfg_scale=scale, null_label=NULL, guided_channels=3, generator=gens(0, 1, 2))
    for rows in ([0, 2], [1]):
        shape = (len(rows), *shapes[rows[0]])
        row_gens = gens(*rows) + gens(*[100 + r for r in rows])            # the unconditional half is unused
        z = torch.stack(draw_noise([shape[1:]] * len(rows), row_gens[: len(rows)]))
        y = torch.cat([labels[rows], torch.full((len(rows),), NULL)])
        batch = diffusion.p_sample_loop(model.forward_with_cfg, (2 * len(rows), *shape[1:]), torch.cat([z, z]),
                                        model_kwargs=dict(y=y, cfg_scale=scale), device="cpu", generator=row_gens)
        for i, r in enumerate(rows):
            assert_close(packed[r], batch[i], atol=1e-4, rtol=1e-4, name=f"sample {r}")


def test_hybrid_loss_batch_and_packed():
    model = tiny_dit(learn_sigma=True)
    diffusion = create_diffusion("")
    latents = [randn(4, 8, 8, seed=1), randn(4, 4, 6, seed=2), randn(4, 8, 8, seed=3)]
    noise = [randn(*x.shape, seed=10 + b) for b, x in enumerate(latents)]
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2])
    packed = diffusion.training_losses_packed(dit_adapter(model, time_scale=1.0, keep_variance=True), latents, t,
                                              patch_size=PATCH, y=y, noise=noise)
    for rows in ([0, 2], [1]):
        batch = diffusion.training_losses(model, torch.stack([latents[r] for r in rows]), t[rows],
                                          model_kwargs=dict(y=y[rows]), noise=torch.stack([noise[r] for r in rows]))
        for key in ("loss", "mse", "vb"):
            assert_close(packed[key][rows], batch[key], atol=1e-4, rtol=1e-4, name=key)
    # the VB term trains the variance only: no gradient reaches the eps half of the output
    output = torch.cat([randn(1, 4, 8, 8, seed=5), torch.zeros(1, 4, 8, 8)], 1).requires_grad_()
    terms = diffusion.training_losses(lambda x_t, base_t: output, latents[0][None], t[1:2], noise=noise[0][None])
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert not grad[:, :4].any() and grad[:, 4:].any()


BAD_STEPS = [
    (torch.tensor([-1, 3]), r"t: expected steps in \[0, 10\) of this 10-step process, got t\[0\] = -1"),
    (torch.tensor([3, 10]), r"t: expected steps in \[0, 10\) of this 10-step process, got t\[1\] = 10"),
    (torch.tensor([1.0, 3.0]), r"t: expected a \(2,\) integer tensor of steps in \[0, 10\).*got dtype torch.float32"),
    (torch.tensor([True, False]), r"t: expected a \(2,\) integer tensor.*got dtype torch.bool"),
    (torch.tensor([1, 2, 3]), r"t: expected a \(2,\) integer tensor.*got shape \(3,\)"),
    (torch.tensor([[1, 2]]), r"t: expected a \(2,\) integer tensor.*got shape \(1, 2\)"),
]


@pytest.mark.parametrize("t, match", BAD_STEPS)
def test_ddpm_refuses_steps_out_of_range_float_or_wrong_length(t, match):
    diffusion = create_diffusion("10", learn_sigma=False)
    x = randn(2, 4, 4, 4, seed=1)

    def model(x_t, base_t, **kwargs):
        return torch.zeros_like(x_t)

    calls = {
        "q_sample": lambda: diffusion.q_sample(x, t, x),
        "q_posterior_mean_variance": lambda: diffusion.q_posterior_mean_variance(x, x, t),
        "output_distribution": lambda: diffusion.output_distribution(x, x, t, clip_denoised=True),
        "p_sample": lambda: diffusion.p_sample(model, x, t),
        "training_losses": lambda: diffusion.training_losses(model, x, t),
        "training_losses_packed": lambda: diffusion.training_losses_packed(
            lambda x_t, seqs, base_t, y: torch.zeros_like(x_t), [x[0], x[1, :, :2]], t, patch_size=PATCH),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match=r"t: expected a \(2,\) integer tensor.*got int"):
        diffusion.q_sample(x, 3, x)


@pytest.mark.parametrize("respacing, match", [
    ("1", r"timestep_respacing: expected a respacing that keeps at least 2 of the 1000 steps.*got '1', which keeps 1"),
    ("0", r"timestep_respacing: .*got '0', which keeps 0"),
    ("ddim1", r"timestep_respacing: section_counts: cannot take exactly 1 of 1000 steps"),
    ("abc", r"timestep_respacing: section_counts: expected 'ddimN', 'N' or comma-separated counts"),
    ("250,", r"timestep_respacing: section_counts: expected .*got '250,'"),
    ("-5", r"timestep_respacing: section_counts: expected .*got '-5'"),
    ([2.5], r"timestep_respacing: section_counts: expected .*got \[2.5\]"),
])
def test_create_diffusion_refuses_respacings_that_cannot_sample(respacing, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion(respacing)


def test_two_step_process_samples():
    diffusion = create_diffusion("2", learn_sigma=False)
    assert diffusion.timestep_map.tolist() == [0, 999]
    out = diffusion.p_sample_loop(lambda x, t: torch.zeros_like(x), (2, 4, 4, 4), device="cpu",
                                  generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match=r"num_diffusion_timesteps: expected an int >= 2.*got 1"):
        create_diffusion("", diffusion_steps=1)
    with pytest.raises(ValueError, match=r"use_timesteps: expected at least 2 steps in \[0, 100\).*got 1"):
        GaussianDiffusion(get_named_beta_schedule("linear", 100), use_timesteps=[3])


def test_gaussian_diffusion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(get_named_beta_schedule("linear", 10), loss_type="l1")
    with pytest.raises(ValueError, match="schedule_name"):
        get_named_beta_schedule("cosine", 10)
