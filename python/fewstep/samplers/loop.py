"""The whole sampling loop."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fewstep.samplers.base import Sampler


def sample(denoiser: Callable, x_T: torch.Tensor, sampler: Sampler, *, num_steps: Optional[int] = None,
           guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Run ``sampler`` from standard normal ``x_T`` (scaled by ``sampler.init_noise_sigma``, as
    diffusers pipelines do) and return the final sample.

    ``denoiser(model_input, t)`` gets the scaled model input and ``t = sampler.timesteps[i]``, a
    0-dim CPU tensor of the sampler's timestep dtype (int64, float32 or float64, as diffusers).
    With ``guidance_scale`` it returns ``(cond, uncond)`` and CFG (and ``guidance_rescale``) is
    fused into each step. ``num_steps`` calls ``sampler.set_timesteps`` first. No host-device sync.
    """
    if guidance_scale is None and guidance_rescale != 0.0:
        raise ValueError(f"guidance_rescale: expected 0 without guidance_scale, got {guidance_rescale}")
    if num_steps is not None:
        sampler.set_timesteps(num_steps)
    x = x_T if sampler.init_noise_sigma == 1.0 else x_T * sampler.init_noise_sigma
    for i in range(sampler.num_steps):
        out = denoiser(sampler.scale_model_input(x, i), sampler.timesteps[i])
        if guidance_scale is None:
            x = sampler.step(out, i, x, generator=generator)
        else:
            cond, uncond = out
            x = sampler.step(cond, i, x, uncond=uncond, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale, generator=generator)
    return x
