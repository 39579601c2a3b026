"""Training objectives and samplers for diffusion transformers on packed batches.

    FlowMatching, sample_timesteps,          rectified flow: x_t = (1 - t) x0 + t noise, velocity target
    shift_timesteps, frame_timesteps          noise - x0, logit-normal t, per-sample resolution shift
    sample, flow_schedule                     Euler / Heun ODE samplers over packed lists of shapes
    GaussianDiffusion, create_diffusion,      the official DiT DDPM (linear betas, respacing, learned-range
    space_timesteps, get_named_beta_schedule  variance, hybrid loss), batch and packed
    dit_adapter, classifier_free_guidance,    the packed model-function protocol: the reference DiT in pack
    draw_noise, segment_mean                  order, CFG in one sequence, reproducible noise, per-sample means
"""

from packdit.diffusion.flow import (
    BASE_TOKENS,
    MAX_SHIFT,
    FlowMatching,
    frame_timesteps,
    full_token_counts,
    sample_timesteps,
    shift_timesteps,
    timestep_shift_factor,
)
from packdit.diffusion.gaussian import GaussianDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps
from packdit.diffusion.packed import ModelFn, classifier_free_guidance, dit_adapter, draw_noise, segment_mean
from packdit.diffusion.samplers import flow_schedule, sample

__all__ = [
    "BASE_TOKENS", "MAX_SHIFT", "FlowMatching", "frame_timesteps", "full_token_counts", "sample_timesteps",
    "shift_timesteps", "timestep_shift_factor",
    "GaussianDiffusion", "create_diffusion", "get_named_beta_schedule", "space_timesteps",
    "ModelFn", "classifier_free_guidance", "dit_adapter", "draw_noise", "segment_mean",
    "flow_schedule", "sample",
]
