"""Distillation methods: many-step teacher -> 1-4 step student (see :mod:`fewstep.distill.base`)."""
from fewstep.distill.base import DistillationMethod
from fewstep.distill.boot import BOOT
from fewstep.distill.dmd2 import DMD, DMD2
from fewstep.distill.guided import GuidedDistillation
from fewstep.distill.lcd import LCD
from fewstep.distill.lora import add_lora, lora_disabled

__all__ = ["BOOT", "DMD", "DMD2", "DistillationMethod", "GuidedDistillation", "LCD", "add_lora", "lora_disabled"]
