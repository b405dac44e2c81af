"""Euler samplers in sigma form: k-diffusion's Euler on x = x0 + sigma eps (diffusers'
``EulerDiscreteScheduler``) and flow-matching Euler on x = (1 - sigma) x0 + sigma eps
(``FlowMatchEulerDiscreteScheduler``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fewstep.ops import StepCoeffs
from fewstep.samplers import schedules
from fewstep.samplers.base import (PREDICTION_TYPES, Sampler, StepPlan, check_bool, check_choice,
                                   check_int, check_number, vp_train_sigmas)
from fewstep.samplers.schedules import to_float32


class EulerSampler(Sampler):
    """Euler (Karras et al. 2022, Alg. 2 with churn) as diffusers' ``EulerDiscreteScheduler``.

    The model sees x / sqrt(sigma^2 + 1) (``scale_model_input``) and the float32 timestep of
    sigma. Churn: gamma = min(s_churn / n, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax; then
    x += s_noise sqrt(sigma_hat^2 - sigma^2) z. Quirk kept: v_prediction's x0 uses sigma, not sigma_hat.
    """

    def __init__(self, *, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero", s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> None:
        super().__init__()
        self.train_sigmas = vp_train_sigmas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                            rescale_betas_zero_snr)
        self.num_train_timesteps = num_train_timesteps
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.prediction_type = prediction_type
        self.use_karras_sigmas = check_bool("use_karras_sigmas", use_karras_sigmas)
        self.sigma_min = None if sigma_min is None else check_number("sigma_min", sigma_min, low=0.0, low_open=True)
        self.sigma_max = None if sigma_max is None else check_number("sigma_max", sigma_max, low=0.0, low_open=True)
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = check_int("steps_offset", steps_offset)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self.final_sigmas_type = final_sigmas_type
        self.s_churn = check_number("s_churn", s_churn, low=0.0)
        self.s_tmin = check_number("s_tmin", s_tmin, low=0.0, allow_inf=True)
        self.s_tmax = check_number("s_tmax", s_tmax, low=0.0, allow_inf=True)
        self.s_noise = check_number("s_noise", s_noise, low=0.0)
        self.sigmas: list[float] = []
        self.init_noise_sigma = self._noise_sigma(float(self.train_sigmas.max()))

    def _noise_sigma(self, max_sigma: float) -> float:
        # diffusers' rule: the exact VE std sqrt(sigma^2 + 1) for 'leading', sigma alone otherwise.
        return max_sigma if self.timestep_spacing in ("linspace", "trailing") else math.sqrt(max_sigma ** 2 + 1)

    def _build(self, num_steps):
        table = self.train_sigmas.tolist()
        timesteps = [to_float32(t) for t in schedules.spaced_timesteps(
            self.timestep_spacing, num_steps, self.num_train_timesteps, self.steps_offset)]
        sigmas = [schedules.np_interp(t, table) for t in timesteps]
        if self.use_karras_sigmas:
            sigma_min = self.sigma_min if self.sigma_min is not None else sigmas[-1]
            sigma_max = self.sigma_max if self.sigma_max is not None else sigmas[0]
            sigmas = schedules.karras_sigmas(sigma_min, sigma_max, num_steps)
            log_sigmas = self.train_sigmas.log().float().tolist()
            timesteps = [to_float32(schedules.sigma_to_timestep(s, log_sigmas)) for s in sigmas]
        sigmas = [to_float32(s) for s in sigmas] + [table[0] if self.final_sigmas_type == "sigma_min" else 0.0]
        self.sigmas = sigmas
        self.init_noise_sigma = self._noise_sigma(max(sigmas))

        plans = []
        for k in range(num_steps):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            gamma = min(self.s_churn / num_steps, 2 ** 0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1)
            if self.prediction_type == "epsilon":
                a_x, a_m = 1.0, -sigma_hat
            elif self.prediction_type == "sample":
                a_x, a_m = 0.0, 1.0
            else:
                a_x, a_m = 1 / (sigma ** 2 + 1), -sigma / math.sqrt(sigma ** 2 + 1)
            ratio = (sigma_next - sigma_hat) / sigma_hat  # x_next = x + (x - x0) / sigma_hat * dt
            coeffs = StepCoeffs(k_churn=self.s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) if gamma > 0 else 0.0,
                                a_x=a_x, a_m=a_m, o_x=1 + ratio, o_0=-ratio, d_0=1.0)
            plans.append(StepPlan(coeffs, input_scale=1 / math.sqrt(sigma ** 2 + 1), draws_noise=gamma > 0))
        return torch.tensor(timesteps, dtype=torch.float32), plans


class FlowMatchEulerSampler(Sampler):
    """Flow-matching Euler (SD3/FLUX) as diffusers' ``FlowMatchEulerDiscreteScheduler``.

    The model predicts the velocity v = eps - x0 at timestep N * sigma; x_next = x + (sigma_next -
    sigma) v, or with ``stochastic_sampling`` x_next = (1 - sigma_next) x0 + sigma_next z.
    """

    def __init__(self, *, num_train_timesteps: int = 1000, shift: float = 1.0,
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 stochastic_sampling: bool = False) -> None:
        super().__init__()
        self.num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, low=2)
        self.shift = check_number("shift", shift, low=0.0, low_open=True)
        self.shift_terminal = (None if not shift_terminal else
                               check_number("shift_terminal", shift_terminal, low=0.0, high=1.0))
        if self.shift_terminal == 1.0:
            raise ValueError("shift_terminal: expected a number in [0, 1), got 1.0")
        self.use_karras_sigmas = check_bool("use_karras_sigmas", use_karras_sigmas)
        self.stochastic_sampling = check_bool("stochastic_sampling", stochastic_sampling)
        # diffusers' sigma range: the shifted train grid [1/N .. 1], evaluated in float32.
        ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
        ends = shift * ends / (1 + (shift - 1) * ends)
        self.train_sigma_max, self.train_sigma_min = ends.double().tolist()
        self.sigmas: list[float] = []

    def _build(self, num_steps):
        n_train = self.num_train_timesteps
        grid = schedules.np_linspace(self.train_sigma_max * n_train, self.train_sigma_min * n_train, num_steps)
        sigmas = schedules.shift_flow_sigmas([t / n_train for t in grid], self.shift)
        if self.shift_terminal is not None:  # stretch so the last sigma is exactly shift_terminal
            scale = (1 - sigmas[-1]) / (1 - self.shift_terminal)
            sigmas = [1 - (1 - s) / scale for s in sigmas]
        if self.use_karras_sigmas:
            sigmas = schedules.karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        sigmas = [to_float32(s) for s in sigmas] + [0.0]
        self.sigmas = sigmas
        timesteps = [to_float32(s * n_train) for s in sigmas[:-1]]

        plans = []
        for k in range(num_steps):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            if self.stochastic_sampling:
                coeffs = StepCoeffs(a_x=1.0, a_m=-sigma, o_0=1 - sigma_next, o_z=sigma_next, d_0=1.0)
            else:
                coeffs = StepCoeffs(a_x=1.0, a_m=-sigma, o_x=1.0, o_m=sigma_next - sigma, d_0=1.0)
            plans.append(StepPlan(coeffs, draws_noise=self.stochastic_sampling))
        return torch.tensor(timesteps, dtype=torch.float32), plans
