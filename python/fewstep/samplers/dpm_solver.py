"""DPM-Solver++ (Lu et al. 2022) 1S/2M, ODE and SDE, as diffusers' ``DPMSolverMultistepScheduler``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fewstep.ops import StepCoeffs
from fewstep.samplers import schedules
from fewstep.samplers.base import (PREDICTION_TYPES, Sampler, StepPlan, check_bool, check_choice, check_int,
                                   vp_train_sigmas, vp_x0_and_eps)
from fewstep.samplers.schedules import to_float32


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """VP (alpha_t, sigma_t) of a k-diffusion sigma."""
    alpha = 1 / math.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha


def _log_snr(sigma: float) -> float:
    alpha, sigma_t = _alpha_sigma(sigma)
    return math.log(alpha) - math.log(sigma_t)


class DPMSolverMultistepSampler(Sampler):
    """Data-prediction DPM-Solver++ on x0 estimates, with the previous step's x0 kept in the sampler.

    ``algorithm_type``: ``dpmsolver++`` (ODE) or ``sde-dpmsolver++`` (noise every step);
    ``solver_order`` 1 or 2 (``midpoint`` or ``heun`` second-order term). Like diffusers, the first
    step is first order, and so is the last when ``euler_at_final``, when ``lower_order_final`` with
    fewer than 15 steps, or when the final sigma is zero.
    """

    def __init__(self, *, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", algorithm_type: str = "dpmsolver++",
                 solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                 use_karras_sigmas: bool = False, final_sigmas_type: str = "zero", timestep_spacing: str = "linspace",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False) -> None:
        super().__init__()
        self.train_sigmas = vp_train_sigmas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                            rescale_betas_zero_snr)
        self.num_train_timesteps = num_train_timesteps
        # diffusers rounds Karras timesteps to integers except for the cosine schedule (then truncates).
        self.round_karras_timesteps = beta_schedule != "squaredcos_cap_v2"
        check_int("solver_order", solver_order, low=1)
        check_choice("solver_order", solver_order, (1, 2), unsupported=(3,))
        self.solver_order = solver_order
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.prediction_type = prediction_type
        check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"),
                     unsupported=("dpmsolver", "sde-dpmsolver"))
        self.stochastic = algorithm_type == "sde-dpmsolver++"
        check_choice("solver_type", solver_type, ("midpoint", "heun"))
        self.solver_type = solver_type
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)
        self.euler_at_final = check_bool("euler_at_final", euler_at_final)
        self.use_karras_sigmas = check_bool("use_karras_sigmas", use_karras_sigmas)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self.final_sigmas_type = final_sigmas_type
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = check_int("steps_offset", steps_offset)
        self.sigmas: list[float] = []

    def _spaced_timesteps(self, num_steps: int) -> list[int]:
        # diffusers spaces n + 1 points and drops the last (t = 0) for linspace and leading.
        n_train = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return [int(round(t)) for t in schedules.np_linspace(0, n_train - 1, num_steps + 1)[::-1][:-1]]
        if self.timestep_spacing == "leading":
            ratio = n_train // (num_steps + 1)
            return [k * ratio + self.steps_offset for k in range(num_steps, 0, -1)]
        return [int(round(t)) - 1 for t in schedules.np_arange(n_train, 0, -n_train / num_steps)]

    def _build(self, num_steps):
        table = self.train_sigmas.tolist()
        if self.use_karras_sigmas:
            sigmas = schedules.karras_sigmas(table[0], table[-1], num_steps)
            log_sigmas = self.train_sigmas.log().float().tolist()
            fractional = [schedules.sigma_to_timestep(s, log_sigmas) for s in sigmas]
            timesteps = [int(round(t)) if self.round_karras_timesteps else int(t) for t in fractional]
        else:
            timesteps = self._spaced_timesteps(num_steps)
            if max(timesteps) >= self.num_train_timesteps:
                raise ValueError(f"steps_offset: the spaced timesteps {timesteps} exceed the train range "
                                 f"[0, {self.num_train_timesteps})")
            sigmas = [table[t] for t in timesteps]
        sigmas = [to_float32(s) for s in sigmas] + [table[0] if self.final_sigmas_type == "sigma_min" else 0.0]
        self.sigmas = sigmas
        num_steps = len(timesteps)

        step_coeffs = []
        for k in range(num_steps):
            last = k == num_steps - 1
            first_order = (self.solver_order == 1 or k == 0 or (last and (
                self.euler_at_final or (self.lower_order_final and num_steps < 15)
                or self.final_sigmas_type == "zero")))
            alpha_s, sigma_s = _alpha_sigma(sigmas[k])
            x0 = vp_x0_and_eps(self.prediction_type, alpha_s, sigma_s)
            coeffs = dict(a_x=x0["a_x"], a_m=x0["a_m"], d_0=1.0)
            coeffs.update(self._update(sigmas[k + 1], sigmas[k], None if first_order else sigmas[k - 1]))
            step_coeffs.append(StepCoeffs(**coeffs))
        plans = [StepPlan(c, draws_noise=self.stochastic,
                          keeps_x0=k + 1 < num_steps and step_coeffs[k + 1].o_p != 0.0)
                 for k, c in enumerate(step_coeffs)]
        return torch.tensor(timesteps, dtype=torch.int64), plans

    def _update(self, sigma_next: float, sigma: float, sigma_prev: Optional[float]) -> dict[str, float]:
        """Output coefficients x_next = o_x x + o_0 x0 + o_p x0_prev + o_z z."""
        if sigma_next == 0.0:  # lambda -> inf: both variants land on x0
            return dict(o_0=1.0)
        alpha_t, sigma_t = _alpha_sigma(sigma_next)
        _, sigma_s = _alpha_sigma(sigma)
        h = _log_snr(sigma_next) - _log_snr(sigma)
        if h == 0.0:  # Karras grid ending on sigma_min with final sigma_min: a zero-length last step
            return dict(o_x=1.0)
        if self.stochastic:
            decay = 1 - math.exp(-2.0 * h)
            o_x, c0 = sigma_t / sigma_s * math.exp(-h), alpha_t * decay
            o_z = sigma_t * math.sqrt(decay)
        else:
            o_x, c0, o_z = sigma_t / sigma_s, -alpha_t * math.expm1(-h), 0.0
        if sigma_prev is None:
            return dict(o_x=o_x, o_0=c0, o_z=o_z)
        # Second order: D1 = (x0 - x0_prev) / r0 with r0 = h_prev / h.
        r0 = (_log_snr(sigma) - _log_snr(sigma_prev)) / h
        if self.stochastic:
            c1 = 0.5 * c0 if self.solver_type == "midpoint" else alpha_t * (decay / (-2.0 * h) + 1.0)
        else:
            c1 = 0.5 * c0 if self.solver_type == "midpoint" else alpha_t * (math.expm1(-h) / h + 1.0)
        return dict(o_x=o_x, o_0=c0 + c1 / r0, o_p=-c1 / r0, o_z=o_z)
