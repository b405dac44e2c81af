"""Samplers on a discrete variance-preserving schedule x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps:
DDIM, DDPM (ancestral), LCM, TCD and DMD2's multistep re-noising."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fewstep.ops import StepCoeffs
from fewstep.samplers import schedules
from fewstep.samplers.base import (PREDICTION_TYPES, Sampler, StepPlan, check_bool, check_choice,
                                   check_int, check_number, check_timestep_count, vp_alphas_cumprod,
                                   vp_x0_and_eps)


def _spaced_int_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int) -> list[int]:
    return [int(round(t)) for t in schedules.spaced_timesteps(spacing, num_steps, num_train_timesteps, steps_offset)]


def _check_in_table(timesteps: Sequence[int], num_train_timesteps: int) -> None:
    if max(timesteps) >= num_train_timesteps or min(timesteps) < 0:
        raise ValueError(f"timesteps: expected values in [0, {num_train_timesteps}) (num_train_timesteps), "
                         f"got {list(timesteps)}")


def _clip_bound(clip_sample: bool, clip_sample_range: float) -> float:
    return clip_sample_range if clip_sample else math.inf


def _lcm_timesteps(num_steps: int, num_train_timesteps: int, original_inference_steps: int) -> list[int]:
    """LCM/TCD: ``num_steps`` evenly indexed from the distillation grid [c-1, 2c-1, ..., N-1], c = N // original."""
    check_timestep_count(num_steps, original_inference_steps, "original_inference_steps")
    c = num_train_timesteps // original_inference_steps
    grid = [k * c - 1 for k in range(original_inference_steps, 0, -1)]
    return [grid[int(math.floor(j))] for j in schedules.np_linspace(0, len(grid), num_steps, endpoint=False)]


class _VPSampler(Sampler):
    def __init__(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                 rescale_betas_zero_snr, prediction_type) -> None:
        super().__init__()
        self.alphas_cumprod = vp_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                trained_betas, rescale_betas_zero_snr)
        self.num_train_timesteps = num_train_timesteps
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.prediction_type = prediction_type

    def _x0_eps(self, t: int) -> dict[str, float]:
        abar = self.alphas_cumprod[t]
        return vp_x0_and_eps(self.prediction_type, math.sqrt(abar), math.sqrt(1 - abar))


class DDIMSampler(_VPSampler):
    """DDIM (Song et al. 2021) as diffusers' ``DDIMScheduler``; ``eta`` = 1 is DDPM-like noise.

    Quirk kept: the previous timestep is always t - N // n, whatever the spacing.
    """

    def __init__(self, *, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 clip_sample: bool = True, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, eta: float = 0.0,
                 use_clipped_model_output: bool = False) -> None:
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         rescale_betas_zero_snr, prediction_type)
        self.clip_x0 = _clip_bound(check_bool("clip_sample", clip_sample),
                                   check_number("clip_sample_range", clip_sample_range, low=0.0, low_open=True))
        self.final_alphas_cumprod = 1.0 if check_bool("set_alpha_to_one", set_alpha_to_one) else self.alphas_cumprod[0]
        self.steps_offset = check_int("steps_offset", steps_offset)
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        self.timestep_spacing = timestep_spacing
        self.eta = check_number("eta", eta, low=0.0)
        self.use_clipped_model_output = check_bool("use_clipped_model_output", use_clipped_model_output)

    def _build(self, num_steps):
        n_train = self.num_train_timesteps
        check_timestep_count(num_steps, n_train, "num_train_timesteps")
        timesteps = _spaced_int_timesteps(self.timestep_spacing, num_steps, n_train, self.steps_offset)
        _check_in_table(timesteps, n_train)
        plans = []
        for t in timesteps:
            prev = t - n_train // num_steps
            abar, abar_prev = self.alphas_cumprod[t], (self.alphas_cumprod[prev] if prev >= 0 else self.final_alphas_cumprod)
            alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
            c = self._x0_eps(t)
            if self.use_clipped_model_output:  # eps re-derived from the clipped x0 (GLIDE)
                c.update(e_x=1 / sigma, e_m=0.0, e_0=-alpha / sigma)
            variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
            std = self.eta * math.sqrt(variance)
            coeffs = StepCoeffs(**c, o_0=math.sqrt(abar_prev), o_e=math.sqrt(max(1 - abar_prev - std ** 2, 0.0)),
                                o_z=std, d_0=1.0)
            plans.append(StepPlan(coeffs, draws_noise=self.eta > 0, clip_x0=self.clip_x0))
        return torch.tensor(timesteps, dtype=torch.int64), plans


class DDPMSampler(_VPSampler):
    """Ancestral DDPM (Ho et al. 2020) as diffusers' ``DDPMScheduler`` on the spaced timesteps.

    ``variance_type``: ``fixed_small`` (posterior variance, clamped at 1e-20; ``fixed_small_log``
    is the same value) or ``fixed_large`` (beta_t). Noise is added wherever t > 0.
    """

    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

    def __init__(self, *, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True, prediction_type: str = "epsilon",
                 clip_sample_range: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False) -> None:
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         rescale_betas_zero_snr, prediction_type)
        check_choice("variance_type", variance_type, self.VARIANCE_TYPES,
                     unsupported=("fixed_large_log", "learned", "learned_range"))
        self.variance_type = variance_type
        self.clip_x0 = _clip_bound(check_bool("clip_sample", clip_sample),
                                   check_number("clip_sample_range", clip_sample_range, low=0.0, low_open=True))
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = check_int("steps_offset", steps_offset)

    def _build(self, num_steps):
        check_timestep_count(num_steps, self.num_train_timesteps, "num_train_timesteps")
        timesteps = _spaced_int_timesteps(self.timestep_spacing, num_steps, self.num_train_timesteps,
                                          self.steps_offset)
        _check_in_table(timesteps, self.num_train_timesteps)
        plans = []
        for k, t in enumerate(timesteps):
            prev = timesteps[k + 1] if k + 1 < num_steps else -1
            abar, abar_prev = self.alphas_cumprod[t], (self.alphas_cumprod[prev] if prev >= 0 else 1.0)
            alpha_t = abar / abar_prev
            beta_t = 1 - alpha_t
            c = self._x0_eps(t)
            if self.variance_type == "fixed_large":
                std = math.sqrt(beta_t)
            else:
                std = math.sqrt(max((1 - abar_prev) / (1 - abar) * beta_t, 1e-20))
            coeffs = StepCoeffs(a_x=c["a_x"], a_m=c["a_m"], o_x=math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar),
                                o_0=math.sqrt(abar_prev) * beta_t / (1 - abar), o_z=std if t > 0 else 0.0, d_0=1.0)
            plans.append(StepPlan(coeffs, draws_noise=t > 0, clip_x0=self.clip_x0))
        return torch.tensor(timesteps, dtype=torch.int64), plans


class LCMSampler(_VPSampler):
    """Latent Consistency Model multistep sampling as diffusers' ``LCMScheduler``.

    denoised = c_skip(t) x + c_out(t) x0 (boundary scalings at ``timestep_scaling`` * t); then
    re-noised to the next timestep, except at the last step, which returns denoised itself.
    """

    SIGMA_DATA = 0.5

    def __init__(self, *, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: Optional[Sequence[float]] = None,
                 original_inference_steps: int = 50, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 prediction_type: str = "epsilon", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False) -> None:
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         rescale_betas_zero_snr, prediction_type)
        self.original_inference_steps = check_int("original_inference_steps", original_inference_steps, low=1)
        check_timestep_count(original_inference_steps, num_train_timesteps, "num_train_timesteps")
        self.clip_x0 = _clip_bound(check_bool("clip_sample", clip_sample),
                                   check_number("clip_sample_range", clip_sample_range, low=0.0, low_open=True))
        self.timestep_scaling = check_number("timestep_scaling", timestep_scaling, low=0.0, low_open=True)

    def _boundary_scalings(self, t: int) -> tuple[float, float]:
        scaled = t * self.timestep_scaling
        c_skip = self.SIGMA_DATA ** 2 / (scaled ** 2 + self.SIGMA_DATA ** 2)
        c_out = scaled / math.sqrt(scaled ** 2 + self.SIGMA_DATA ** 2)
        return c_skip, c_out

    def _build(self, num_steps):
        timesteps = _lcm_timesteps(num_steps, self.num_train_timesteps, self.original_inference_steps)
        plans = []
        for k, t in enumerate(timesteps):
            c = self._x0_eps(t)
            c_skip, c_out = self._boundary_scalings(t)
            last = k + 1 == num_steps
            abar_next = self.alphas_cumprod[timesteps[k + 1]] if not last else 1.0
            keep = math.sqrt(abar_next)
            coeffs = StepCoeffs(a_x=c["a_x"], a_m=c["a_m"], o_x=keep * c_skip, o_0=keep * c_out,
                                o_z=0.0 if last else math.sqrt(1 - abar_next), d_x=c_skip, d_0=c_out)
            plans.append(StepPlan(coeffs, draws_noise=not last, clip_x0=self.clip_x0))
        return torch.tensor(timesteps, dtype=torch.int64), plans


class TCDSampler(_VPSampler):
    """Trajectory Consistency Distillation's strategic stochastic sampling (diffusers' ``TCDScheduler``).

    ``eta`` is the paper's gamma: jump to s = floor((1 - gamma) t_next) with the predicted x0 and
    eps, then forward-noise from s to t_next. Quirks kept: diffusers never clips x0 in TCD, and
    computes (1 - gamma) * t_next in float32 before the floor.
    """

    def __init__(self, *, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: Optional[Sequence[float]] = None,
                 original_inference_steps: int = 50, prediction_type: str = "epsilon",
                 rescale_betas_zero_snr: bool = False, eta: float = 0.3) -> None:
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         rescale_betas_zero_snr, prediction_type)
        self.original_inference_steps = check_int("original_inference_steps", original_inference_steps, low=1)
        check_timestep_count(original_inference_steps, num_train_timesteps, "num_train_timesteps")
        self.eta = check_number("eta", eta, low=0.0, high=1.0)

    def _build(self, num_steps):
        timesteps = _lcm_timesteps(num_steps, self.num_train_timesteps, self.original_inference_steps)
        plans = []
        for k, t in enumerate(timesteps):
            last = k + 1 == num_steps
            t_next = 0 if last else timesteps[k + 1]
            s = int(torch.floor((1 - self.eta) * torch.tensor(t_next)))
            abar_s, abar_next = self.alphas_cumprod[s], self.alphas_cumprod[t_next]
            c = self._x0_eps(t)
            renoise = self.eta > 0 and not last
            keep = math.sqrt(abar_next / abar_s) if renoise else 1.0
            coeffs = StepCoeffs(**c, o_0=keep * math.sqrt(abar_s), o_e=keep * math.sqrt(1 - abar_s),
                                o_z=math.sqrt(1 - abar_next / abar_s) if renoise else 0.0, d_0=1.0)
            plans.append(StepPlan(coeffs, draws_noise=renoise))
        return torch.tensor(timesteps, dtype=torch.int64), plans


class DMD2Sampler(_VPSampler):
    """DMD2's multistep generator schedule (Yin et al. 2024): at each fixed timestep the generator
    predicts x0, which is re-noised to the next timestep with fresh noise,
    x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) z; the last step returns x0.

    The schedule is fixed: ``set_timesteps`` takes ``len(timesteps)`` steps.
    """

    def __init__(self, *, timesteps: Sequence[int] = (999, 749, 499, 249), num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 trained_betas: Optional[Sequence[float]] = None, prediction_type: str = "epsilon",
                 rescale_betas_zero_snr: bool = False) -> None:
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         rescale_betas_zero_snr, prediction_type)
        timesteps = list(timesteps)
        if (not timesteps or any(isinstance(t, bool) or not isinstance(t, int) for t in timesteps)
                or any(a <= b for a, b in zip(timesteps, timesteps[1:]))):
            raise ValueError(f"timesteps: expected a non-empty strictly descending list of ints, got {timesteps}")
        _check_in_table(timesteps, num_train_timesteps)
        self.fixed_timesteps = timesteps

    def _build(self, num_steps):
        if num_steps != len(self.fixed_timesteps):
            raise ValueError(f"num_steps: expected {len(self.fixed_timesteps)} (the fixed DMD2 timesteps "
                             f"{self.fixed_timesteps}), got {num_steps}")
        plans = []
        for k, t in enumerate(self.fixed_timesteps):
            last = k + 1 == num_steps
            abar_next = 1.0 if last else self.alphas_cumprod[self.fixed_timesteps[k + 1]]
            c = self._x0_eps(t)
            coeffs = StepCoeffs(a_x=c["a_x"], a_m=c["a_m"], o_0=math.sqrt(abar_next),
                                o_z=0.0 if last else math.sqrt(1 - abar_next), d_0=1.0)
            plans.append(StepPlan(coeffs, draws_noise=not last))
        return torch.tensor(self.fixed_timesteps, dtype=torch.int64), plans
