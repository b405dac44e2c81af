"""Noise schedules and timestep spacings, reproducing diffusers' tables value for value.

diffusers builds its tables (betas, alphas_cumprod, per-timestep sigmas) in float32, and
trained models expect exactly those values; float64 recomputation would differ by up to ~1e-4
relative (train sigmas near t=0). So the tables here are the same float32 values, held in
float64, and everything derived from them per step (sampler coefficients) is float64 host
math. Small per-step grids use numpy's exact formulas for linspace/arange/interp so that
timesteps equal diffusers' bit for bit. Everything runs on the CPU, once per set_timesteps.
"""
from __future__ import annotations

import bisect
import math
import struct
from typing import Optional, Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # GLIDE's squared-cosine alpha_bar, discretized in float64 then stored as float32 (as diffusers).
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def _betas_float32(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                   trained_betas: Optional[Sequence[float]]) -> torch.Tensor:
    if trained_betas is not None:
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return _cosine_betas(num_train_timesteps)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last one is exactly 0."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
          beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
          rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """diffusers' betas (float32 values, returned as float64)."""
    b = _betas_float32(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    if rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b.double()


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                   beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                   rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """diffusers' ``alphas_cumprod`` (cumprod of 1 - beta in float32, returned as float64)."""
    b = betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
              rescale_betas_zero_snr).float()
    return torch.cumprod(1.0 - b, dim=0).double()


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """k-diffusion sigmas sqrt((1 - abar) / abar) per train timestep (diffusers' float32 values)."""
    a = alphas_cumprod.float()
    return (((1 - a) / a) ** 0.5).double()


def np_linspace(start: float, stop: float, num: int, endpoint: bool = True) -> list[float]:
    """``numpy.linspace`` in float64, same formula (start + i * step, exact endpoint)."""
    div = (num - 1) if endpoint else num
    if num == 1 or div == 0:
        return [float(start)][:num]
    step = (stop - start) / div
    values = [i * step + start for i in range(num)]
    if endpoint:
        values[-1] = float(stop)
    return values


def np_arange(start: float, stop: float, step: float) -> list[float]:
    """``numpy.arange`` for floats: length ceil((stop - start) / step), values start + i * delta
    with delta = (start + step) - start, as numpy fills them."""
    length = max(math.ceil((stop - start) / step), 0)
    delta = (start + step) - start
    return [start + i * delta for i in range(length)]


def np_interp(x: float, table: Sequence[float]) -> float:
    """``numpy.interp(x, arange(len(table)), table)`` for one point."""
    last = len(table) - 1
    if x >= last:
        return float(table[last])
    if x <= 0:
        return float(table[0])
    j = int(math.floor(x))
    if x == j:
        return float(table[j])
    slope = float(table[j + 1]) - float(table[j])
    return slope * (x - j) + float(table[j])


def spaced_timesteps(timestep_spacing: str, num_steps: int, num_train_timesteps: int,
                     steps_offset: int = 0) -> list[float]:
    """Descending timesteps of DDIM/DDPM/Euler (unrounded for ``linspace``; callers round or cast).

    ``leading``: multiples of N // n plus ``steps_offset``; ``trailing``: round(N - k N/n) - 1;
    ``linspace``: linspace(0, N - 1, n). (Lin et al. 2023, Table 2.)
    """
    _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if timestep_spacing == "linspace":
        return np_linspace(0, num_train_timesteps - 1, num_steps)[::-1]
    if timestep_spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return [float(k * ratio + steps_offset) for k in reversed(range(num_steps))]
    # Python's round on floats is numpy's (ties to even).
    return [float(round(t)) - 1 for t in np_arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)]


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 eq. 5: (max^(1/rho) + r (min^(1/rho) - max^(1/rho)))^rho, r in [0, 1]."""
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(max_inv_rho + r * (min_inv_rho - max_inv_rho)) ** rho for r in np_linspace(0, 1, num_steps)]


def sigma_to_timestep(sigma: float, log_sigmas: Sequence[float]) -> float:
    """Fractional train timestep of ``sigma`` by linear interpolation in log sigma (increasing
    ``log_sigmas``), as diffusers' ``_sigma_to_t``."""
    log_sigma = math.log(max(sigma, 1e-10))
    low = min(max(bisect.bisect_right(log_sigmas, log_sigma) - 1, 0), len(log_sigmas) - 2)
    lo, hi = float(log_sigmas[low]), float(log_sigmas[low + 1])
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def shift_flow_sigmas(sigmas: Sequence[float], shift: float) -> list[float]:
    """SD3's resolution shift of flow-matching sigmas: s' = shift s / (1 + (shift - 1) s)."""
    return [shift * s / (1 + (shift - 1) * s) for s in sigmas]


def to_float32(x: float) -> float:
    """The float32 value nearest ``x`` (diffusers stores its step tables in float32)."""
    return struct.unpack("f", struct.pack("f", x))[0]
