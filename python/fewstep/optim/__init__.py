"""Optimizers on fused multi-tensor kernels."""
from fewstep.optim.adamw import FusedAdamW

__all__ = ["FusedAdamW"]
