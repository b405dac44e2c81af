"""Distillation methods: many-step teacher -> 1-4 step student (see :mod:`fewstep.distill.base`)."""
from fewstep.distill.base import DistillationMethod

__all__ = ["DistillationMethod"]
