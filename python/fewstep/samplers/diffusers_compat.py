"""``from_diffusers``: the fewstep sampler equivalent to a diffusers scheduler, read from its
class name and config only (fewstep does not import diffusers)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from fewstep.samplers.base import Sampler
from fewstep.samplers.consistency import ConsistencySampler
from fewstep.samplers.discrete import DDIMSampler, DDPMSampler, LCMSampler, TCDSampler
from fewstep.samplers.dpm_solver import DPMSolverMultistepSampler
from fewstep.samplers.euler import EulerSampler, FlowMatchEulerSampler

_THRESHOLDING_KEYS = ("dynamic_thresholding_ratio", "sample_max_value")  # only read when thresholding


@dataclasses.dataclass(frozen=True)
class _Mapping:
    sampler: type
    step_options: tuple[str, ...] = ()  # diffusers step() arguments the sampler takes at construction
    required: dict = dataclasses.field(default_factory=dict)  # unsupported options: the only value accepted
    inert: tuple[str, ...] = ()  # config keys that do not change diffusers' math in the supported cases


_MAPPINGS = {
    "DDIMScheduler": _Mapping(DDIMSampler, ("eta", "use_clipped_model_output"), {"thresholding": False},
                              _THRESHOLDING_KEYS),
    "DDPMScheduler": _Mapping(DDPMSampler, (), {"thresholding": False}, _THRESHOLDING_KEYS),
    # LCM/TCD take their grid from original_inference_steps: spacing, offset and the final alpha
    # (t_next is never negative) are unused; TCD's step never clips or uses timestep_scaling.
    "LCMScheduler": _Mapping(LCMSampler, (), {"thresholding": False},
                             _THRESHOLDING_KEYS + ("set_alpha_to_one", "steps_offset", "timestep_spacing")),
    "TCDScheduler": _Mapping(TCDSampler, ("eta",), {"thresholding": False},
                             _THRESHOLDING_KEYS + ("set_alpha_to_one", "steps_offset", "timestep_spacing",
                                                   "clip_sample", "clip_sample_range", "timestep_scaling")),
    "EulerDiscreteScheduler": _Mapping(
        EulerSampler, ("s_churn", "s_tmin", "s_tmax", "s_noise"),
        {"use_exponential_sigmas": False, "use_beta_sigmas": False, "interpolation_type": "linear",
         "timestep_type": "discrete"}),
    "FlowMatchEulerDiscreteScheduler": _Mapping(
        FlowMatchEulerSampler, (),
        {"use_dynamic_shifting": False, "invert_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False},
        ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")),
    "DPMSolverMultistepScheduler": _Mapping(
        DPMSolverMultistepSampler, (),
        {"thresholding": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
         "use_flow_sigmas": False, "lambda_min_clipped": -math.inf, "variance_type": None,
         "use_dynamic_shifting": False},
        _THRESHOLDING_KEYS + ("flow_shift", "time_shift_type")),
    "CMStochasticIterativeScheduler": _Mapping(ConsistencySampler),
}


def from_diffusers(scheduler: Any, **step_kwargs) -> Sampler:
    """Build the fewstep sampler equivalent to ``scheduler`` (read: ``type(scheduler).__name__`` and
    ``scheduler.config``). ``step_kwargs`` are the options diffusers' ``step()`` would get
    (``eta`` for DDIM/TCD, ``use_clipped_model_output`` for DDIM, ``s_churn``/``s_tmin``/
    ``s_tmax``/``s_noise`` for Euler). Options fewstep does not support raise NotImplementedError."""
    name = type(scheduler).__name__
    if name not in _MAPPINGS:
        raise NotImplementedError(f"scheduler: {name} has no fewstep sampler (supported: {sorted(_MAPPINGS)})")
    mapping = _MAPPINGS[name]
    unknown_step = sorted(set(step_kwargs) - set(mapping.step_options))
    if unknown_step:
        raise ValueError(f"step_kwargs: {name}.step options {list(mapping.step_options)} expected, got "
                         f"unsupported {unknown_step}")
    kwargs = {}
    for key, value in dict(scheduler.config).items():
        if key.startswith("_") or key in mapping.inert:
            continue
        if key in mapping.required:
            if value != mapping.required[key]:
                raise NotImplementedError(f"{name} config {key}={value!r} is not supported by fewstep "
                                          f"(only {mapping.required[key]!r})")
            continue
        kwargs[key] = value
    accepted = set(mapping.sampler.__init__.__kwdefaults__ or {})
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise NotImplementedError(f"{name} config option(s) {unknown} are not supported by "
                                  f"{mapping.sampler.__name__}")
    return mapping.sampler(**kwargs, **step_kwargs)
