"""The distillation losses besides DMD: pseudo-Huber, LCD's teacher step and loss, the fake score's
denoising loss and the softplus GAN losses.

Semantics: :mod:`fewstep.reference.distill_losses`. Losses are 0-dim, float32 (float64 for
float64 inputs), computed in float32 for bf16/fp16/fp32 inputs.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from fewstep.losses import distill_losses_checks as checks
from fewstep.reference import distill_losses as ref


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """``mean(sqrt((pred - target)^2 + c^2) - c)``; gradients reach ``pred`` and ``target``."""
    checks.check_pseudo_huber(pred, target, c)
    return ref.pseudo_huber_reference(pred, target, float(c), _compute_dtype(pred))


def denoising(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fake score's denoising loss: ``mean_b weight_b * mean((pred_b - target_b)^2)`` over the
    samples ``b`` of the batch (``weight`` [B], e.g. per-timestep weights; None: all 1)."""
    checks.check_denoising(pred, target, weight)
    return ref.denoising_reference(pred, target, weight, _compute_dtype(pred))[0]


def lcd_teacher_step(x_t: torch.Tensor, cond_out: torch.Tensor, uncond_out: torch.Tensor, t: torch.Tensor,
                     t_prev: torch.Tensor, guidance_scale: Union[float, torch.Tensor], alphas_cumprod: torch.Tensor,
                     prediction: str = "eps") -> torch.Tensor:
    """LCD's CFG-augmented DDIM solver step from ``t`` to ``t_prev`` (int64 [B]) with the teacher's
    conditional and unconditional raw outputs: ``x0_w = x0_c + w (x0_c - x0_u)``, ``eps_w`` likewise,
    ``x_prev = sqrt(a_prev) x0_w + sqrt(1 - a_prev) eps_w`` with ``a = alphas_cumprod[t]`` looked up
    on the device. ``guidance_scale``: a float or a [B] tensor. Returns x_prev in x_t's dtype."""
    checks.check_lcd_teacher_step(x_t, cond_out, uncond_out, t, t_prev, guidance_scale, alphas_cumprod, prediction)
    out = ref.lcd_teacher_step_reference(x_t, cond_out, uncond_out, t, t_prev, guidance_scale, alphas_cumprod,
                                         prediction, _compute_dtype(x_t))
    return out.to(x_t.dtype)


def lcd(student_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target_out: torch.Tensor,
        x_prev: torch.Tensor, t_prev: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "eps",
        loss: str = "huber", huber_c: float = 0.001, sigma_data: float = 0.5,
        timestep_scaling: float = 10.0) -> torch.Tensor:
    """LCD's consistency loss. The boundary scalings ``c_skip(t) = sd^2 / ((s t)^2 + sd^2)``,
    ``c_out(t) = s t / sqrt((s t)^2 + sd^2)`` (sd = ``sigma_data``, s = ``timestep_scaling``) turn the
    student's raw output at ``(x_t, t)`` and the target network's at ``(x_prev, t_prev)`` into
    consistency outputs ``c_skip x + c_out x0``; the loss is the pseudo-Huber (``loss="huber"``,
    c = ``huber_c``) or squared-error (``"l2"``) mean of their difference. Gradients reach
    ``student_out`` only: the target is under stop-gradient and ``x_t`` is data."""
    checks.check_lcd(student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod, prediction, loss, huber_c,
                     sigma_data, timestep_scaling)
    return ref.lcd_reference(student_out, x_t, t, target_out.detach(), x_prev.detach(), t_prev, alphas_cumprod,
                             prediction, loss, float(huber_c), float(sigma_data), float(timestep_scaling),
                             _compute_dtype(student_out))


def gan_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-real_logits) + mean softplus(fake_logits)`` (logits of any shapes)."""
    if real_logits is None:
        raise TypeError("real_logits: expected a torch.Tensor, got NoneType")
    checks.check_gan(real_logits, fake_logits)
    return ref.gan_discriminator_reference(real_logits, fake_logits, _compute_dtype(fake_logits))


def gan_generator(fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-fake_logits)`` (logits of any shape)."""
    checks.check_gan(None, fake_logits)
    return ref.gan_generator_reference(fake_logits, _compute_dtype(fake_logits))
