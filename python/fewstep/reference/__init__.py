"""Pure-PyTorch references for every fewstep op; tests compare the kernels against these."""
from fewstep.reference.sampler_step import cfg_rescale_factor_reference, sampler_step_reference

__all__ = ["cfg_rescale_factor_reference", "sampler_step_reference"]
