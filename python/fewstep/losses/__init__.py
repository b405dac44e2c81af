"""Fused distillation losses."""
from fewstep.losses.dmd import dmd
from fewstep.losses.distill_losses import denoising, gan_discriminator, gan_generator, lcd, lcd_teacher_step, pseudo_huber

__all__ = ["denoising", "dmd", "gan_discriminator", "gan_generator", "lcd", "lcd_teacher_step", "pseudo_huber"]
