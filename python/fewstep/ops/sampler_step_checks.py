"""Argument checks of ``fewstep::sampler_step`` in Python, shared by its fake, Triton and reference paths."""
from __future__ import annotations

import torch

from fewstep import _checks
from fewstep.reference.sampler_step import COEFF_NAMES


def check_step_args(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs, guidance_scale, clip_x0,
                    return_x0) -> None:
    """The checks of ``fewstep::sampler_step``'s C++ glue (csrc/sampler_step/sampler_step.cpp),
    for the paths that do not reach it: fake tensors (torch.compile, meta), Triton, reference."""
    _checks.check_tensor("x", x)
    for name, t in (("model_output", model_output), ("uncond", uncond), ("noise", noise), ("prev_x0", prev_x0)):
        _checks.check_like(name, t, "x", x)
    if len(coeffs) != len(COEFF_NAMES):
        raise ValueError(f"coeffs: expected {len(COEFF_NAMES)} coefficients (fewstep.ops.StepCoeffs.as_list()), "
                         f"got {len(coeffs)}")
    for c in coeffs:
        _checks.check_finite("coeffs", c)
    _checks.check_finite("guidance_scale", guidance_scale)
    if not clip_x0 > 0:
        raise ValueError(f"clip_x0: expected a positive bound (inf for none), got {clip_x0}")
    if cfg_rescale is not None:
        batch = x.shape[0] if x.dim() else 1
        want = torch.float64 if x.dtype == torch.float64 else torch.float32
        if cfg_rescale.dtype != want:
            raise TypeError(f"cfg_rescale: expected dtype {want} (fewstep.ops.cfg_rescale_factor's, for x of "
                            f"dtype {x.dtype}), got {cfg_rescale.dtype}")
        if cfg_rescale.shape != (batch,) or cfg_rescale.device != x.device:
            raise ValueError(f"cfg_rescale: expected shape [{batch}] on {x.device} (one factor per sample of x), "
                             f"got {list(cfg_rescale.shape)} on {cfg_rescale.device}")
    named = dict(zip(COEFF_NAMES, coeffs))
    if noise is None and (named["o_z"] != 0 or named["k_churn"] != 0):
        raise ValueError(f"noise: expected a tensor because coeffs o_z={named['o_z']} and "
                         f"k_churn={named['k_churn']} use it, got None")
    if prev_x0 is None and named["o_p"] != 0:
        raise ValueError(f"prev_x0: expected a tensor because coeffs o_p={named['o_p']} uses it, got None")


def check_rescale_args(cond, uncond, guidance_scale, guidance_rescale) -> None:
    """The checks of ``fewstep::cfg_rescale_factor`` (its C++ glue makes the same)."""
    _checks.check_tensor("cond", cond)
    _checks.check_like("uncond", uncond, "cond", cond)
    if cond.dim() < 2:
        raise ValueError(f"cond: expected a batched tensor [B, ...] with at least 2 dims, got shape {list(cond.shape)}")
    if cond.numel() // cond.shape[0] < 2:
        raise ValueError(f"cond: expected at least 2 elements per sample for a standard deviation, got shape "
                         f"{list(cond.shape)}")
    _checks.check_finite("guidance_scale", guidance_scale)
    _checks.check_finite("guidance_rescale", guidance_rescale)
