"""Consistency-model multistep sampling in k-diffusion sigma form (Song et al. 2023), as
diffusers' ``CMStochasticIterativeScheduler``."""
from __future__ import annotations

import math

import torch

from fewstep.ops import StepCoeffs
from fewstep.samplers.base import Sampler, StepPlan, check_bool, check_int, check_number, check_timestep_count
from fewstep.samplers.schedules import to_float32


class ConsistencySampler(Sampler):
    """denoised = clip(c_skip(sigma) x + c_out(sigma) F), then x_next = denoised +
    s_noise sqrt(sigma_next^2 - sigma_min^2) z, on Karras sigmas taken at the steps' train indices.

    The model sees x / sqrt(sigma^2 + sigma_data^2) and timestep 250 log(sigma) (float64).
    """

    def __init__(self, *, num_train_timesteps: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5, s_noise: float = 1.0, rho: float = 7.0, clip_denoised: bool = True) -> None:
        super().__init__()
        self.num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, low=2)
        self.sigma_min = check_number("sigma_min", sigma_min, low=0.0, low_open=True)
        self.sigma_max = check_number("sigma_max", sigma_max, low=sigma_min, low_open=True)
        self.sigma_data = check_number("sigma_data", sigma_data, low=0.0, low_open=True)
        self.s_noise = check_number("s_noise", s_noise, low=0.0)
        self.rho = check_number("rho", rho, low=0.0, low_open=True)
        self.clip_x0 = 1.0 if check_bool("clip_denoised", clip_denoised) else math.inf
        self.init_noise_sigma = self.sigma_max
        self.sigmas: list[float] = []

    def _build(self, num_steps):
        n_train = self.num_train_timesteps
        check_timestep_count(num_steps, n_train, "num_train_timesteps")
        ratio = n_train // num_steps
        min_inv_rho, max_inv_rho = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = [(max_inv_rho + (k * ratio / (n_train - 1)) * (min_inv_rho - max_inv_rho)) ** self.rho
                  for k in range(num_steps)]
        timesteps = [1000 * 0.25 * math.log(s + 1e-44) for s in sigmas]
        sigmas = [to_float32(s) for s in sigmas + [self.sigma_min]]
        self.sigmas = sigmas

        plans = []
        sd2 = self.sigma_data ** 2
        for k in range(num_steps):
            sigma = sigmas[k]
            sigma_hat = min(max(sigmas[k + 1], self.sigma_min), self.sigma_max)
            c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
            c_out = (sigma - self.sigma_min) * self.sigma_data / math.sqrt(sigma ** 2 + sd2)
            o_z = self.s_noise * math.sqrt(max(sigma_hat ** 2 - self.sigma_min ** 2, 0.0)) if num_steps > 1 else 0.0
            coeffs = StepCoeffs(a_x=c_skip, a_m=c_out, o_0=1.0, o_z=o_z, d_0=1.0)
            plans.append(StepPlan(coeffs, input_scale=1 / math.sqrt(sigma ** 2 + sd2), draws_noise=num_steps > 1,
                                  clip_x0=self.clip_x0))
        return torch.tensor(timesteps, dtype=torch.float64), plans
