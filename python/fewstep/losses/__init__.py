"""Fused distillation losses."""
from fewstep.losses.dmd import dmd

__all__ = ["dmd"]
