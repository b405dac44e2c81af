"""The sampler interface: per-step coefficients precomputed on the host, one fused op per step."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch

from fewstep import _checks
from fewstep.ops import StepCoeffs, sampler_step
from fewstep.samplers import schedules

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Everything one step needs, decided in ``set_timesteps`` (host floats only).

    ``draws_noise`` is True exactly where diffusers draws noise, so a shared seed gives the same
    stream; ``keeps_x0`` makes the step return its x0 for the next step (multistep solvers).
    """

    coeffs: StepCoeffs
    input_scale: float = 1.0
    draws_noise: bool = False
    clip_x0: float = math.inf
    keeps_x0: bool = False


def check_choice(name: str, value, choices: Sequence, unsupported: Sequence = ()) -> None:
    """ValueError for an invalid value; NotImplementedError for a valid diffusers value fewstep lacks."""
    if value in unsupported:
        raise NotImplementedError(f"{name}={value!r} is not supported by fewstep (supported: {list(choices)})")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_number(name: str, value, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, allow_inf: bool = False) -> float:
    """A real number in [low, high] (or (low, high] when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: expected a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def check_int(name: str, value, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return value


def vp_x0_and_eps(prediction_type: str, alpha: float, sigma: float) -> dict[str, float]:
    """Coefficients of x0 = a_x x + a_m m and eps = e_x x + e_m m for x = alpha x0 + sigma eps.

    Both come from the raw model output (as diffusers derives eps before clipping x0).
    """
    if prediction_type == "epsilon":
        if alpha == 0.0:
            raise ValueError("prediction_type: 'epsilon' cannot give x0 where alphas_cumprod is 0 "
                             "(zero terminal SNR); use 'v_prediction'")
        return dict(a_x=1 / alpha, a_m=-sigma / alpha, e_x=0.0, e_m=1.0)
    if prediction_type == "sample":
        return dict(a_x=0.0, a_m=1.0, e_x=1 / sigma, e_m=-alpha / sigma)
    return dict(a_x=alpha, a_m=-sigma, e_x=sigma, e_m=alpha)


class Sampler:
    """Base of fewstep's samplers.

    ``set_timesteps(n)`` fixes the schedule; then for ``i`` in ``range(n)``:
    ``x = s.step(denoiser(s.scale_model_input(x, i), s.timesteps[i]), i, x)``. Each step is one
    ``fewstep.ops.sampler_step`` call with host-float coefficients: no host-device sync.
    """

    #: Standard deviation of the initial noise: ``x_T = init_noise_sigma * randn``.
    init_noise_sigma: float = 1.0

    def __init__(self) -> None:
        self._timesteps: Optional[torch.Tensor] = None
        self._plans: list[StepPlan] = []
        self._last_x0: Optional[torch.Tensor] = None
        self._last_x0_step = -1

    # Subclasses: return the (descending) timesteps and one StepPlan per step.
    def _build(self, num_steps: int) -> tuple[torch.Tensor, list[StepPlan]]:
        raise NotImplementedError

    def set_timesteps(self, num_steps: int) -> None:
        """Compute the timesteps and every step's coefficients for ``num_steps`` steps."""
        check_int("num_steps", num_steps, low=1)
        timesteps, plans = self._build(num_steps)
        self._timesteps, self._plans = timesteps, plans
        self._last_x0, self._last_x0_step = None, -1

    def _require_timesteps(self, what: str) -> None:
        if self._timesteps is None:
            raise RuntimeError(f"{type(self).__name__}.{what}: call set_timesteps(num_steps) first")

    @property
    def timesteps(self) -> torch.Tensor:
        """1-D CPU tensor of the model's timestep per step (diffusers' values and dtype)."""
        self._require_timesteps("timesteps")
        return self._timesteps

    @property
    def num_steps(self) -> int:
        self._require_timesteps("num_steps")
        return len(self._plans)

    def _plan(self, i: int, what: str) -> StepPlan:
        self._require_timesteps(what)
        _checks.check_index("i", i, len(self._plans))
        return self._plans[i]

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model's input at step ``i`` (x itself, or x / sqrt(sigma^2 + c) for sigma-form samplers)."""
        scale = self._plan(i, "scale_model_input").input_scale
        return x if scale == 1.0 else x * scale

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        x: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        *,
        uncond: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        generator: Optional[torch.Generator] = None,
        return_denoised: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Step ``i``: x_t -> x_next. With ``uncond``, ``model_output`` is the conditional output and
        CFG (and rescale) is fused into the step. ``noise`` is drawn from ``generator`` when the
        step needs it and none is given. ``return_denoised`` also returns the step's denoised
        estimate (x0; LCM's c_skip x + c_out x0)."""
        plan = self._plan(i, "step")
        if plan.draws_noise and noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_x0 = None
        if plan.coeffs.o_p != 0.0:
            if self._last_x0_step != i - 1:
                raise RuntimeError(f"{type(self).__name__}.step: step {i} needs the x0 of step {i - 1}; "
                                   f"run the steps in order from 0 after set_timesteps")
            prev_x0 = self._last_x0
        return_x0 = plan.keeps_x0 or return_denoised
        out = sampler_step(x, model_output, plan.coeffs, uncond=uncond, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, noise=noise if plan.draws_noise else None,
                           prev_x0=prev_x0, clip_x0=plan.clip_x0, return_x0=return_x0)
        if not return_x0:
            return out
        x_next, denoised = out
        if plan.keeps_x0:
            self._last_x0, self._last_x0_step = denoised, i
        return (x_next, denoised) if return_denoised else x_next


def vp_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                      trained_betas: Optional[Sequence[float]], rescale_betas_zero_snr: bool) -> list[float]:
    """Validated diffusers ``alphas_cumprod`` as Python floats (see :mod:`fewstep.samplers.schedules`)."""
    check_int("num_train_timesteps", num_train_timesteps, low=2)
    check_number("beta_start", beta_start, low=0.0, high=1.0, low_open=True)
    check_number("beta_end", beta_end, low=0.0, high=1.0, low_open=True)
    check_bool("rescale_betas_zero_snr", rescale_betas_zero_snr)
    if trained_betas is None:
        check_choice("beta_schedule", beta_schedule, schedules.BETA_SCHEDULES, unsupported=("sigmoid", "laplace"))
    elif len(trained_betas) != num_train_timesteps:
        raise ValueError(f"trained_betas: expected {num_train_timesteps} values (num_train_timesteps), "
                         f"got {len(trained_betas)}")
    return schedules.alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                    trained_betas, rescale_betas_zero_snr).tolist()


def vp_train_sigmas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                    trained_betas: Optional[Sequence[float]], rescale_betas_zero_snr: bool) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar) per train timestep (float64), for the sigma-form samplers."""
    abar = vp_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             rescale_betas_zero_snr)
    if rescale_betas_zero_snr:  # diffusers keeps sigma finite at the last train step
        abar[-1] = 2.0 ** -24
    return schedules.vp_sigmas(torch.tensor(abar, dtype=torch.float64))


def check_timestep_count(num_steps: int, limit: int, limit_name: str) -> None:
    if num_steps > limit:
        raise ValueError(f"num_steps: expected at most {limit} ({limit_name}), got {num_steps}")
