"""Reference semantics of the fused sampler step (``fewstep::sampler_step``).

Every few-step sampler update in fewstep is one affine map of the step's inputs, so a
single kernel covers DDIM, DDPM, LCM, TCD, consistency, Euler, flow-matching Euler,
DPM-Solver++ and DMD2 re-noising. With ``m`` the (guided) model output, ``z`` the
noise and ``p`` the previous step's x0 (multistep solvers):

    m  = uncond + w * (cond - uncond)      (only when an unconditional output is given)
    m  = m * rescale[b]                    (only when a CFG-rescale factor is given)
    xt = x + k_churn * z                   (Euler's churn; 0 elsewhere)
    x0 = clamp(a_x * xt + a_m * m, -clip, clip)
    eps = e_x * xt + e_m * m + e_0 * x0
    x_next = o_x * xt + o_m * m + o_0 * x0 + o_e * eps + o_p * p + o_z * z
    denoised = d_x * xt + d_0 * x0         (returned when asked: LCM's denoised, DPM's x0)

The coefficients are per-step Python floats computed on the host from the schedule, so
the step never reads a device scalar (no host-device sync, CUDA-graph capturable).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# Order of the scalar coefficients in the op's ``coeffs`` argument.
COEFF_NAMES = ("k_churn", "a_x", "a_m", "e_x", "e_m", "e_0",
               "o_x", "o_m", "o_0", "o_e", "o_p", "o_z", "d_x", "d_0")


def sampler_step_reference(
    x: torch.Tensor,
    model_output: torch.Tensor,
    model_output_uncond: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    prev_x0: Optional[torch.Tensor],
    cfg_rescale: Optional[torch.Tensor],
    coeffs: Sequence[float],
    guidance_scale: float,
    clip_x0: float,
    return_x0: bool,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    c = dict(zip(COEFF_NAMES, coeffs))
    f = lambda t: t.to(compute_dtype)  # noqa: E731
    m = f(model_output)
    if model_output_uncond is not None:
        u = f(model_output_uncond)
        m = u + guidance_scale * (m - u)
    if cfg_rescale is not None:
        m = m * f(cfg_rescale).view(-1, *([1] * (m.dim() - 1)))
    z = f(noise) if noise is not None else torch.zeros_like(m)
    xt = f(x) + c["k_churn"] * z
    x0 = c["a_x"] * xt + c["a_m"] * m
    if math.isfinite(clip_x0):
        x0 = x0.clamp(-clip_x0, clip_x0)
    eps = c["e_x"] * xt + c["e_m"] * m + c["e_0"] * x0
    p = f(prev_x0) if prev_x0 is not None else torch.zeros_like(m)
    x_next = (c["o_x"] * xt + c["o_m"] * m + c["o_0"] * x0 + c["o_e"] * eps
              + c["o_p"] * p + c["o_z"] * z)
    if return_x0:
        denoised = (c["d_x"] * xt + c["d_0"] * x0).to(x.dtype)
    else:
        denoised = x.new_empty(0)
    return x_next.to(x.dtype), denoised


def cfg_rescale_factor_reference(
    model_output: torch.Tensor,
    model_output_uncond: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float,
) -> torch.Tensor:
    """Per-sample factor (float64 for float64 inputs, else float32) of CFG rescale (Lin et al. 2023, as diffusers' ``rescale_noise_cfg``).

    guided = u + w (c - u); rescaled = guided * std(c) / std(guided) (unbiased std over all
    but the batch dim); result = phi * rescaled + (1 - phi) * guided = guided * factor.
    """
    c = model_output.double().flatten(1)
    u = model_output_uncond.double().flatten(1)
    g = u + guidance_scale * (c - u)
    ratio = c.std(dim=1) / g.std(dim=1)
    factor = guidance_rescale * ratio + (1.0 - guidance_rescale)
    return factor if model_output.dtype == torch.float64 else factor.float()
