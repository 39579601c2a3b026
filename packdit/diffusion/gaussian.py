"""Gaussian diffusion (DDPM) as trained and sampled by the official DiT, for batches and packed batches.

Forward process over ``T`` steps (Ho et al. arXiv 2006.11239), step index t in 0..T-1::

    q(x_t | x_0)       = N(sqrt(abar_t) x_0, (1 - abar_t) I),        abar_t = prod_{s<=t} (1 - beta_s)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),      beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)

The model predicts eps (or x_0 with ``predict_xstart``), so ``x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps``,
clipped to [-1, 1] when sampling with ``clip_denoised``. With ``learn_sigma`` (improved DDPM, Nichol &
Dhariwal arXiv 2102.09672) the model also outputs v in [-1, 1] per element and the reverse variance is::

    log sigma_t^2 = f log beta_t + (1 - f) log beta~_t,        f = (v + 1) / 2

(``beta~_0`` = 0 is replaced by ``beta~_1`` in the log). Otherwise the variance is fixed: beta~_t
(``sigma_small``) or ``[beta~_1, beta_1, ..., beta_{T-1}]`` (large). Training loss: MSE on eps, plus with
learned sigma the variational-bound term in bits of the variance with the mean frozen (stop-gradient).

Respacing (:func:`space_timesteps`) keeps a subset S of the T steps and re-derives
``beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}}``; the model always sees the original step index
``S_i`` (``timestep_map``). As in the official code every diffusion made by :func:`create_diffusion` is
respaced, also the full one, and all schedule arrays are float64, cast to float32 when used.

The same math runs on packed tokens: every coefficient is indexed per *row* of x, a sample of a
``(B, C, ...)`` batch or a token of a packed ``(N, D)`` sequence (its sample's t), and per-sample means
are segment means. In pack order a token holds ``(C, pt, ph, pw)`` channel-major, so the eps / variance
halves of a learned-sigma output are the first / last ``D`` columns, as they are the first / last C
channels of a batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from packdit._validate import checks_enabled
from packdit.diffusion.packed import (
    Generators,
    ModelFn,
    check_labels,
    classifier_free_guidance,
    draw_noise,
    segment_mean,
    starting_noise,
)
from packdit.layout import DropRate, PatchSize, normalize_patch_size
from packdit.patches import pack, pack_like, unpack

__all__ = ["GaussianDiffusion", "create_diffusion", "get_named_beta_schedule", "space_timesteps"]

LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# ---------------------------------------------------------------------- schedules
MIN_STEPS = 2
"""A process needs 2 steps: the reverse variance of step 0 is taken from step 1 (``beta~_0 = 0``)."""


def _check_num_steps(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < MIN_STEPS:
        raise ValueError(f"{name}: expected an int >= {MIN_STEPS} (step 0's reverse variance comes from step 1), "
                         f"got {value!r}")


def _linspace64(start: float, stop: float, num: int) -> Tensor:
    """``numpy.linspace`` in float64, bit for bit: ``arange(num) * step + start`` with the last value ``stop``."""
    values = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    values[-1] = stop
    return values


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> Tensor:
    """``(T,)`` float64 betas.

    ``"linear"``: Ho et al.'s 1e-4..0.02 over 1000 steps, both ends scaled by ``1000 / T`` so that other T
    keep the same process. ``"squaredcos_cap_v2"``: the cosine schedule
    ``abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2``, ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)``.
    """
    _check_num_steps(num_diffusion_timesteps, "num_diffusion_timesteps")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return _linspace64(scale * 0.0001, scale * 0.02, num_diffusion_timesteps)
    if schedule_name == "squaredcos_cap_v2":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_diffusion_timesteps
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    raise ValueError(f"schedule_name: expected 'linear' or 'squaredcos_cap_v2', got {schedule_name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The steps of a ``num_timesteps`` process that a respaced process keeps.

    ``section_counts`` ``[c_1, ..., c_k]`` (or ``"c_1,...,c_k"``) cuts the steps into k near-equal sections
    (the first ``T % k`` one step longer) and takes ``c_j`` evenly spaced steps of section j, its first and
    last included: offsets ``round(i * (size - 1) / (c_j - 1))`` (Python's round-half-to-even), a single
    step being the section's first. ``"ddimN"``: the DDIM striding ``range(0, T, stride)`` with the
    smallest integer stride that gives exactly N steps.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
    expected = "'ddimN', 'N' or comma-separated counts 'N1,N2,...' per section, or a sequence of ints >= 0"
    counts = section_counts
    ddim = isinstance(section_counts, str) and section_counts.startswith("ddim")
    if isinstance(section_counts, str):
        try:
            counts = [int(c) for c in section_counts.removeprefix("ddim").split(",")]
        except ValueError:
            raise ValueError(f"section_counts: expected {expected}, got {section_counts!r}") from None
    if (not isinstance(counts, Sequence) or not counts or (ddim and len(counts) != 1)
            or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0 for c in counts)):
        raise ValueError(f"section_counts: expected {expected}, got {section_counts!r}")
    if ddim:
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == counts[0]:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"section_counts: cannot take exactly {counts[0]} of {num_timesteps} steps with an "
                         f"integer stride ({section_counts!r})")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, set()
    for j, count in enumerate(counts):
        size = size_per + (1 if j < extra else 0)
        if size < count:
            raise ValueError(f"section_counts: cannot take {count} steps from section {j} of {size} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.add(start + round(position))
            position += stride
        start += size
    return steps


# ---------------------------------------------------------------------- likelihood terms
def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(bin of x) under N(means, e^(2 log_scales)) for data on 256 levels in [-1, 1] (bin width 2/255),
    the outer bins open-ended; per element, in nats, each probability floored at 1e-12."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_over_elements(values: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over all non-batch dims (a batch's per-sample mean)."""
    return values.mean(dim=list(range(1, values.dim())))


def _batch_noise(shape: Sequence[int], generator: Generators, device) -> Tensor:
    """Standard normal (B, ...): from the global RNG like ``torch.randn`` when generator is None, row by row
    from one generator per sample when a sequence is given."""
    if isinstance(generator, Sequence):
        return torch.stack(draw_noise([shape[1:]] * shape[0], generator, device=device))
    return draw_noise([shape], generator, device=device)[0]


# ---------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """A (respaced) DDPM: schedule arrays, training losses and ancestral sampling (see the module docstring).

    Args:
        betas: ``(T,)`` betas of the base process (:func:`get_named_beta_schedule`).
        use_timesteps: the base steps to keep (:func:`space_timesteps`); all when None.
        predict_xstart: the model predicts x_0 instead of eps.
        learn_sigma: the model outputs ``[eps, v]`` (2C channels), learned-range variance.
        sigma_small: fixed variance beta~_t instead of the large one (without ``learn_sigma``).
        loss_type: ``"mse"``, ``"rescaled_mse"`` (VB term times ``T / 1000``), ``"kl"`` (VB only) or
            ``"rescaled_kl"`` (VB times T, an estimate of the full bound).
    """

    def __init__(
        self,
        betas: Tensor | Sequence[float],
        *,
        use_timesteps: Sequence[int] | set[int] | None = None,
        predict_xstart: bool = False,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        loss_type: str = "mse",
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
        base_betas = torch.as_tensor(betas, dtype=torch.float64)
        if base_betas.dim() != 1 or not bool(((base_betas > 0) & (base_betas <= 1)).all()):
            raise ValueError("betas: expected a 1-D sequence of values in (0, 1]")
        self.original_num_steps = base_betas.shape[0]
        kept = sorted(set(range(self.original_num_steps) if use_timesteps is None else use_timesteps))
        if len(kept) < MIN_STEPS or kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(f"use_timesteps: expected at least {MIN_STEPS} steps in [0, {self.original_num_steps}) "
                             f"(step 0's reverse variance comes from step 1), got {len(kept)}: {kept[:8]}")
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.predict_xstart, self.learn_sigma, self.sigma_small = predict_xstart, learn_sigma, sigma_small
        self.loss_type = loss_type

        base_alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)[self.timestep_map]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), base_alphas_cumprod[:-1]])
        betas = 1.0 - base_alphas_cumprod / previous
        self.betas = betas
        self.num_timesteps = betas.shape[0]
        alphas = 1.0 - betas
        ac = self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        ac_prev = self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # beta~_0 = 0: its log is replaced by log beta~_1
        self.posterior_log_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]
        ).log()
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
        self.log_betas = betas.log()
        large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self.fixed_variance, self.fixed_log_variance = (
            (self.posterior_variance, self.posterior_log_variance_clipped) if sigma_small
            else (large_variance, large_variance.log())
        )

    # ------------------------------------------------------------------ step validation
    def _check_steps(self, t: Tensor, rows: int, per: str) -> None:
        """ValueError naming ``t`` unless it is a ``(rows,)`` integer tensor of steps in ``[0, num_timesteps)``.

        dtype and shape are host checks; the range needs one device->host copy and runs while
        :func:`packdit.checks` is on. Public methods check their ``t`` once; the math they share (the
        ``_``-prefixed twins) does not check again.
        """
        expected = f"a ({rows},) integer tensor of steps in [0, {self.num_timesteps}), one per {per}"
        if not isinstance(t, Tensor):
            raise TypeError(f"t: expected {expected}, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"t: expected {expected}, got dtype {t.dtype}")
        if t.shape != (rows,):
            raise ValueError(f"t: expected {expected}, got shape {tuple(t.shape)}")
        if checks_enabled() and rows:
            bad = (t < 0) | (t >= self.num_timesteps)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"t: expected steps in [0, {self.num_timesteps}) of this {self.num_timesteps}-step "
                                 f"process, got t[{i}] = {int(t[i])}")

    # ------------------------------------------------------------------ per-row coefficient math
    @staticmethod
    def _extract(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """``values[t]`` as float32, shaped ``(rows, 1, ...)`` to broadcast over x; t holds one step per row of x."""
        return values.to(t.device)[t].float().reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``; t: one step per row of x (sample or token)."""
        self._check_steps(t, x_start.shape[0], "row of x_start")
        return self._q_sample(x_start, t, noise)

    def _q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), per row step t."""
        self._check_steps(t, x_t.shape[0], "row of x_t")
        return self._q_posterior(x_start, x_t, t)

    def _q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t)
        return mean, variance, self._extract(self.posterior_log_variance_clipped, t, x_t)

    def output_distribution(
        self, model_output: Tensor, x: Tensor, t: Tensor, *, clip_denoised: bool
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output: ``mean``, ``variance``, ``log_variance``, ``pred_xstart``.

        ``model_output``: like x, or ``[eps, v]`` concatenated along dim 1 with ``learn_sigma``; t: one
        step per row of x.
        """
        self._check_steps(t, x.shape[0], "row of x")
        return self._output_distribution(model_output, x, t, clip_denoised=clip_denoised)

    def _output_distribution(self, model_output: Tensor, x: Tensor, t: Tensor, *,
                             clip_denoised: bool) -> dict[str, Tensor]:
        if self.learn_sigma:
            if model_output.shape[1] != 2 * x.shape[1]:
                raise ValueError(
                    f"model_output: expected 2 x {x.shape[1]} = [eps, v] along dim 1, got {tuple(model_output.shape)}"
                )
            model_output, var_values = model_output.split(x.shape[1], dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2                                   # v in [-1, 1] -> f in [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = log_variance.exp()
        else:
            variance = self._extract(self.fixed_variance, t, x).expand_as(x)
            log_variance = self._extract(self.fixed_log_variance, t, x).expand_as(x)
        if self.predict_xstart:
            pred_xstart = model_output
        else:
            pred_xstart = (self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x
                           - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x) * model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self._q_posterior(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _step(self, dist: dict[str, Tensor], t: Tensor, noise: Tensor) -> Tensor:
        """Ancestral step ``mean + sigma * noise``, without noise in rows at t = 0."""
        nonzero = (t != 0).float().reshape(-1, *([1] * (noise.dim() - 1)))
        return dist["mean"] + nonzero * torch.exp(0.5 * dist["log_variance"]) * noise

    def _vb_bits(self, dist: dict[str, Tensor], x_start: Tensor, x_t: Tensor, t: Tensor, t_sample: Tensor,
                 per_sample_mean: Callable[[Tensor], Tensor]) -> Tensor:
        """Per-sample VB term in bits: mean KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, the decoder NLL of x_0 at t = 0."""
        true_mean, _, true_log_variance = self._q_posterior(x_start, x_t, t)
        kl = _normal_kl(true_mean, true_log_variance, dist["mean"], dist["log_variance"])
        kl = per_sample_mean(kl) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, means=dist["mean"], log_scales=0.5 * dist["log_variance"])
        nll = per_sample_mean(nll) / math.log(2.0)
        return torch.where(t_sample == 0, nll, kl)

    def _loss_terms(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, noise: Tensor, t: Tensor,
                    t_sample: Tensor, per_sample_mean: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The official loss terms, per sample; t per row of x, t_sample per sample."""
        if self.loss_type in ("kl", "rescaled_kl"):
            dist = self._output_distribution(model_output, x_t, t, clip_denoised=False)
            vb = self._vb_bits(dist, x_start, x_t, t, t_sample, per_sample_mean)
            return {"loss": vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb}
        terms = {}
        if self.learn_sigma:
            eps_output, var_values = model_output.split(x_t.shape[1], dim=1)
            # the VB term trains the variance only: the mean it sees is frozen (stop-gradient)
            frozen = torch.cat([eps_output.detach(), var_values], dim=1)
            dist = self._output_distribution(frozen, x_t, t, clip_denoised=False)
            terms["vb"] = self._vb_bits(dist, x_start, x_t, t, t_sample, per_sample_mean)
            if self.loss_type == "rescaled_mse":
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)   # the official 1/1000 equivalence factor
            model_output = eps_output
        target = x_start if self.predict_xstart else noise
        terms["mse"] = per_sample_mean((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _model_timesteps(self, t: Tensor) -> Tensor:
        """Respaced step indices -> the base-process steps the model was trained on."""
        return self.timestep_map.to(device=t.device, dtype=t.dtype)[t]

    # ------------------------------------------------------------------ batch path (official API)
    def p_mean_variance(self, model, x: Tensor, t: Tensor, clip_denoised: bool = True,
                        model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """``model(x, base_t, **model_kwargs)`` on a (B, C, ...) batch -> :meth:`output_distribution`."""
        self._check_steps(t, x.shape[0], "sample of x")
        model_output = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        return self._output_distribution(model_output, x, t, clip_denoised=clip_denoised)

    def p_sample(self, model, x: Tensor, t: Tensor, clip_denoised: bool = True, model_kwargs: dict | None = None,
                 generator: Generators = None) -> dict[str, Tensor]:
        """One ancestral step on a batch: ``sample`` x_{t-1} and ``pred_xstart``."""
        dist = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = _batch_noise(x.shape, generator, x.device)
        return {"sample": self._step(dist, t, noise), "pred_xstart": dist["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model, shape: Sequence[int], noise: Tensor | None = None, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, device=None, progress: bool = False,
                      generator: Generators = None) -> Tensor:
        """Ancestral sampling of a (B, C, H, W) batch from step T-1 down to 0, as the official ``p_sample_loop``.

        Without ``generator`` the start (unless ``noise``) and the per-step noise come from the global RNG
        in the official order, so ``torch.manual_seed`` reproduces official samples; ``generator`` (one,
        or one per batch row) makes them independent of it. ``progress`` needs tqdm.
        """
        if device is None:
            owner = getattr(model, "__self__", model)                 # a bound method like DiT.forward_with_cfg
            device = next(owner.parameters()).device if isinstance(owner, torch.nn.Module) else torch.device("cpu")
        x = noise if noise is not None else _batch_noise(tuple(shape), generator, device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps)
        for i in steps:
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
            x = self.p_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                              generator=generator)["sample"]
        return x

    def training_losses(self, model, x_start: Tensor, t: Tensor, model_kwargs: dict | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """The official per-sample losses of a (B, C, ...) batch at steps t (B,): ``loss``, ``mse`` and ``vb``
        (learned sigma), each (B,)."""
        self._check_steps(t, x_start.shape[0], "sample of x_start")
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self._q_sample(x_start, t, noise)
        model_output = model(x_t, self._model_timesteps(t), **(model_kwargs or {}))
        return self._loss_terms(model_output, x_start, x_t, noise, t, t, _mean_over_elements)

    # ------------------------------------------------------------------ packed path
    @torch.no_grad()
    def p_sample_loop_packed(
        self,
        model_fn: ModelFn,
        shapes: Sequence[Sequence[int]],
        *,
        patch_size: PatchSize,
        y: Tensor | None = None,
        cfg_scale: float = 1.0,
        null_label: int | None = None,
        guided_channels: int | None = None,
        noise: Sequence[Tensor] | None = None,
        clip_denoised: bool = True,
        generator: Generators = None,
        device=None,
    ) -> list[Tensor]:
        """Ancestral sampling of samples of any shapes packed in one sequence -> list of tensors of ``shapes``.

        ``model_fn(x_tokens, seqs, base_t (B,), y)`` returns eps (or ``[eps, v]``) tokens in pack order
        (``dit_adapter(dit, time_scale=1, keep_variance=True)``). The start (unless ``noise``) and each
        step's noise are drawn per sample in its own shape with :func:`draw_noise` and packed, so with one
        generator per sample, sample b equals the batch path's row b with that generator.
        ``cfg_scale != 1``: classifier-free guidance in one packed sequence of 2B samples on the first
        ``guided_channels`` channels (default: all eps channels; 3 reproduces the official ``forward_with_cfg``),
        the variance from the conditional half.
        """
        patch_size = normalize_patch_size(patch_size)
        x, seqs = pack(starting_noise(shapes, noise, generator, device), patch_size)
        check_labels(y, len(seqs))
        if cfg_scale != 1.0:
            if null_label is None:
                raise ValueError("cfg_scale != 1 needs the null_label of the unconditional model")
            patch_volume = patch_size[0] * patch_size[1] * patch_size[2]
            guided_columns = x.shape[1] if guided_channels is None else guided_channels * patch_volume
            model_fn = classifier_free_guidance(model_fn, cfg_scale=cfg_scale, null_label=null_label,
                                                guided_columns=guided_columns)
        segment_ids = seqs.segment_ids.long()
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((len(seqs),), i, dtype=torch.long, device=x.device)
            model_output = model_fn(x, seqs, self._model_timesteps(t), y)
            dist = self._output_distribution(model_output, x, t[segment_ids], clip_denoised=clip_denoised)
            step_noise, _ = pack(draw_noise(shapes, generator, device=device), patch_size)
            x = self._step(dist, t[segment_ids], step_noise)
        return unpack(x, seqs, patch_size)

    def training_losses_packed(
        self,
        model_fn: ModelFn,
        latents: Sequence[Tensor],
        t: Tensor,
        *,
        patch_size: PatchSize,
        y: Tensor | None = None,
        noise: Sequence[Tensor] | None = None,
        drop_rate: DropRate = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The official losses for latents of any shapes packed in one sequence, at steps t (B,).

        Token dropping (``drop_rate``) keeps the loss on kept tokens. Each term is (B,), normalised per
        sample (mean over that sample's tokens and channels) like the batch path's ``mean_flat``; also
        returns ``seqs``.
        """
        self._check_steps(t, len(latents), "latent")
        check_labels(y, len(latents))
        x_start, seqs = pack(latents, patch_size, drop_rate=drop_rate, generator=generator)
        if noise is None:
            noise = draw_noise([x.shape for x in latents], generator, device=x_start.device, dtype=x_start.dtype)
        noise = pack_like(noise, seqs, patch_size)
        t_tokens = t[seqs.segment_ids.long()]
        x_t = self._q_sample(x_start, t_tokens, noise)
        model_output = model_fn(x_t, seqs, self._model_timesteps(t), y)

        def per_sample_mean(values: Tensor) -> Tensor:
            return segment_mean(values.mean(dim=1), seqs)

        terms = self._loss_terms(model_output, x_start, x_t, noise, t_tokens, t, per_sample_mean)
        return {**terms, "seqs": seqs}


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The official DiT constructor: ``create_diffusion("")`` for training (all 1000 steps),
    ``create_diffusion("250")`` for sampling, ``"ddim50"`` etc. for DDIM striding. A respacing that keeps
    fewer than 2 steps (``"1"``, ``"0"``) raises ValueError: step 0's reverse variance comes from step 1."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    loss_type = "rescaled_kl" if use_kl else "rescaled_mse" if rescale_learned_sigmas else "mse"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    try:
        kept = space_timesteps(diffusion_steps, timestep_respacing)
    except ValueError as exc:
        raise ValueError(f"timestep_respacing: {exc}") from None
    if len(kept) < MIN_STEPS:
        raise ValueError(f"timestep_respacing: expected a respacing that keeps at least {MIN_STEPS} of the "
                         f"{diffusion_steps} steps (step 0's reverse variance comes from step 1), got "
                         f"{timestep_respacing!r}, which keeps {len(kept)}")
    return GaussianDiffusion(
        betas,
        use_timesteps=kept,
        predict_xstart=predict_xstart,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        loss_type=loss_type,
    )
