"""Public wrappers of fewstep's ops: checks, backend choice, then ``torch.ops.fewstep.*``."""
from fewstep.ops.adamw import adamw_step_
from fewstep.ops.ema import ema_update_
from fewstep.ops.local_window_attention import local_window_attention
from fewstep.ops.sampler_step import StepCoeffs, cfg_rescale_factor, sampler_step

__all__ = ["StepCoeffs", "adamw_step_", "cfg_rescale_factor", "ema_update_", "local_window_attention", "sampler_step"]
