"""The denoiser contract that fewstep's methods speak: any ``model(x_t, t, **cond)`` plus what its
output predicts and the noise schedule it was trained on, giving x0, eps, v and flow exactly.

A schedule maps a timestep to (alpha_t, sigma_t) with ``x_t = alpha_t x0 + sigma_t eps``:
variance-preserving (:class:`VPSchedule`, alpha^2 + sigma^2 = 1, diffusers' DDPM family) or
rectified flow (:class:`FlowSchedule`, alpha = 1 - sigma). The four parametrizations:

    x0, eps;  v = alpha eps - sigma x0 (Salimans & Ho);  flow = eps - x0 (flow matching's velocity)

Any one of them with x_t determines the others; for ``v`` that needs alpha^2 + sigma^2 = 1, so
``v`` is defined on VP schedules only. Timesteps index the schedule's tables on their device: no
host sync.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from fewstep.samplers import schedules

PREDICTIONS = ("eps", "x0", "v", "flow")


class VPSchedule:
    """Variance-preserving schedule from diffusers' ``alphas_cumprod`` (or its arguments)."""

    variance_preserving = True

    def __init__(self, alphas_cumprod: Optional[torch.Tensor] = None, **schedule_kwargs):
        if alphas_cumprod is None:
            alphas_cumprod = schedules.alphas_cumprod(**schedule_kwargs)
        elif schedule_kwargs:
            raise ValueError("schedule_kwargs: expected none when alphas_cumprod is given, got "
                             f"{sorted(schedule_kwargs)}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.dim() != 1 or not bool(((abar >= 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod: expected a 1-D tensor of values in [0, 1]")
        self.num_train_timesteps = abar.numel()
        self._alpha = abar.sqrt()
        self._sigma = (1 - abar).sqrt()
        self._on_device: dict = {}

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables on ``device``, copied once: a blocking copy from host memory per call would be
        a host-device sync in every model evaluation."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = (self._alpha.to(device, dtype), self._sigma.to(device, dtype))
        return self._on_device[key]

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) broadcastable against ``like`` ([B, 1, ...]), in like's float dtype."""
        idx = t.long().to(like.device)
        alpha, sigma = self._tables(like.device, torch.float64 if like.dtype == torch.float64 else torch.float32)
        return _broadcast(alpha[idx], like), _broadcast(sigma[idx], like)


class FlowSchedule:
    """Rectified flow: ``x_t = (1 - sigma) x0 + sigma eps`` with sigma = shift·s / (1 + (shift-1)·s),
    s = t / num_train_timesteps (SD3 / FLUX convention; t may be fractional)."""

    variance_preserving = False

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected an int >= 1, got {num_train_timesteps!r}")
        if not shift > 0:
            raise ValueError(f"shift: expected a number > 0, got {shift!r}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.float64 if like.dtype == torch.float64 else torch.float32
        s = t.to(like.device, compute) / self.num_train_timesteps
        sigma = self.shift * s / (1 + (self.shift - 1) * s)
        sigma = _broadcast(sigma, like)
        return 1 - sigma, sigma


def _broadcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if per_sample.dim() == 0:
        per_sample = per_sample.expand(like.shape[0])
    if per_sample.shape != (like.shape[0],):
        raise ValueError(f"t: expected a scalar or one timestep per sample ({like.shape[0]}), got shape "
                         f"{list(per_sample.shape)}")
    return per_sample.view((-1,) + (1,) * (like.dim() - 1))


@dataclasses.dataclass
class Prediction:
    """One model evaluation, with every parametrization derived exactly (computed in fp32/fp64)."""

    x_t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    variance_preserving: bool

    @property
    def flow(self) -> torch.Tensor:
        return self.eps - self.x0

    @property
    def v(self) -> torch.Tensor:
        if not self.variance_preserving:
            raise ValueError("v: defined for variance-preserving schedules only (alpha^2 + sigma^2 = 1)")
        return self.alpha * self.eps - self.sigma * self.x0


def convert(output: torch.Tensor, prediction: str, x_t: torch.Tensor, alpha: torch.Tensor,
            sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a model output of the given parametrization at x_t = alpha x0 + sigma eps."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "v":  # alpha^2 + sigma^2 = 1
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    # flow = eps - x0 and x_t = alpha x0 + sigma eps  =>  x0 = x_t - sigma flow when alpha + sigma = 1
    x0 = (x_t - sigma * output) / (alpha + sigma)
    return x0, x0 + output


class Denoiser(torch.nn.Module):
    """Wraps ``model(x_t, t, **cond)`` (an ``nn.Module`` or any callable; diffusers models'
    ``.sample`` outputs and tuples are unpacked) with its prediction type and schedule."""

    def __init__(self, model: Callable[..., Any], prediction: str = "eps", schedule=None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {list(PREDICTIONS)}, got {prediction!r}")
        if schedule is None:
            schedule = FlowSchedule() if prediction == "flow" else VPSchedule()
        if not hasattr(schedule, "alpha_sigma"):
            raise TypeError(f"schedule: expected a VPSchedule or FlowSchedule, got {type(schedule).__name__}")
        if prediction == "v" and not schedule.variance_preserving:
            raise ValueError("prediction: 'v' needs a variance-preserving schedule (VPSchedule)")
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x_t, t, **cond), got {type(model).__name__}")
        self.model = model
        self.prediction = prediction
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> Prediction:
        t = torch.as_tensor(t, device=x_t.device)
        out = self.model(x_t, t, **cond)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model: expected an output of x_t's shape {list(x_t.shape)} "
                             f"({self.prediction} prediction), got {got}")
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        compute = alpha.dtype
        x0, eps = convert(out.to(compute), self.prediction, x_t.to(compute), alpha, sigma)
        return Prediction(x_t.to(compute), alpha, sigma, x0, eps, self.schedule.variance_preserving)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, in x0's dtype."""
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, device=x0.device), x0)
        return (alpha * x0.to(alpha.dtype) + sigma * eps.to(alpha.dtype)).to(x0.dtype)
