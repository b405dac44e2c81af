"""fewstep.samplers: few-step diffusion samplers, each step one fused ``fewstep.ops.sampler_step``.

All samplers share :class:`Sampler`'s interface (``set_timesteps``, ``timesteps``,
``scale_model_input``, ``step``); :func:`from_diffusers` maps a diffusers scheduler's config
to its sampler; :func:`sample` runs the whole loop.
"""
from fewstep.samplers import schedules
from fewstep.samplers.base import Sampler, StepPlan
from fewstep.samplers.consistency import ConsistencySampler
from fewstep.samplers.diffusers_compat import from_diffusers
from fewstep.samplers.discrete import DDIMSampler, DDPMSampler, DMD2Sampler, LCMSampler, TCDSampler
from fewstep.samplers.dpm_solver import DPMSolverMultistepSampler
from fewstep.samplers.euler import EulerSampler, FlowMatchEulerSampler
from fewstep.samplers.loop import sample

__all__ = ["ConsistencySampler", "DDIMSampler", "DDPMSampler", "DMD2Sampler", "DPMSolverMultistepSampler",
           "EulerSampler", "FlowMatchEulerSampler", "LCMSampler", "Sampler", "StepPlan", "TCDSampler",
           "from_diffusers", "sample", "schedules"]
