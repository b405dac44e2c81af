"""Reference semantics of the distillation losses besides DMD (``fewstep.losses``).

Every function computes in ``dtype`` (float64 by default) with plain, differentiable PyTorch;
the tests' ground truth and the ``reference`` backend.

- ``pseudo_huber``: ``mean(sqrt((pred - target)^2 + c^2) - c)``.
- ``denoising``: the fake score's per-timestep weighted MSE, ``mean_b weight_b * mean((pred_b - target_b)^2)``;
  also returns the per-sample MSEs.
- LCD (latent consistency distillation; diffusers' ``train_lcm_distill_*`` scripts):
  ``lcd_teacher_step`` is the CFG-augmented DDIM solver step that makes the target's input,
  ``x0_w = x0_c + w (x0_c - x0_u)``, ``eps_w`` likewise, ``x_prev = sqrt(a_prev) x0_w + sqrt(1 - a_prev) eps_w``;
  ``lcd`` applies the boundary scalings ``c_skip(t) = sd^2 / ((s t)^2 + sd^2)``,
  ``c_out(t) = s t / sqrt((s t)^2 + sd^2)`` (``LCMScheduler.get_scalings_for_boundary_condition_discrete``)
  to the student's output at ``(x_t, t)`` and the target's at ``(x_prev, t_prev)`` and takes the
  pseudo-Huber or L2 mean of their difference, the target under stop-gradient.
- GAN (DMD2's head): ``gan_discriminator = mean softplus(-real) + mean softplus(fake)``,
  ``gan_generator = mean softplus(-fake)``.

Timesteps index ``alphas_cumprod`` per sample; an index outside ``[0, len(alphas_cumprod))``
gives NaN (the kernels do the same: they never read out of bounds and never sync to check).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

PREDICTIONS = ("eps", "x0", "v")
LCD_LOSSES = ("huber", "l2")


def pseudo_huber_reference(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    d = pred.to(dtype) - target.to(dtype)
    return (torch.sqrt(d.square() + c * c) - c).mean()


def denoising_reference(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                        dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample MSE [B])."""
    per_sample = (pred.to(dtype) - target.to(dtype)).square().reshape(pred.shape[0], -1).mean(1)
    weighted = per_sample if weight is None else weight.to(dtype) * per_sample
    return weighted.mean(), per_sample


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (like.dim() - 1))


def alphas_at(alphas_cumprod: torch.Tensor, t: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``alphas_cumprod[t]`` per sample, NaN where ``t`` is out of range (no host sync)."""
    table = alphas_cumprod.to(dtype)
    valid = (t >= 0) & (t < table.numel())
    return torch.where(valid, table[t.clamp(0, table.numel() - 1)], torch.full_like(table[:1], float("nan")))


def x0_and_eps(out: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor,
               prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps predictions from a raw model output at ``x_t`` (``alpha_cumprod`` per sample)."""
    a = _per_sample(alpha_cumprod, x_t)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction == "eps":
        return (x_t - sigma * out) / alpha, out
    if prediction == "x0":
        return out, (x_t - alpha * out) / sigma
    if prediction == "v":
        return alpha * x_t - sigma * out, alpha * out + sigma * x_t
    raise ValueError(f"prediction: expected one of {list(PREDICTIONS)}, got {prediction!r}")


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                      dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency model's boundary condition at integer timesteps ``t``."""
    st = timestep_scaling * t.to(dtype)
    c_skip = sigma_data**2 / (st.square() + sigma_data**2)
    c_out = st / (st.square() + sigma_data**2).sqrt()
    return c_skip, c_out


def lcd_teacher_step_reference(x_t: torch.Tensor, cond_out: torch.Tensor, uncond_out: torch.Tensor,
                               t: torch.Tensor, t_prev: torch.Tensor, guidance_scale: Union[float, torch.Tensor],
                               alphas_cumprod: torch.Tensor, prediction: str = "eps",
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x_t = x_t.to(dtype)
    a_t = alphas_at(alphas_cumprod, t, dtype)
    x0_c, eps_c = x0_and_eps(cond_out.to(dtype), x_t, a_t, prediction)
    x0_u, eps_u = x0_and_eps(uncond_out.to(dtype), x_t, a_t, prediction)
    w = _per_sample(guidance_scale.to(dtype), x_t) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
    x0_w = x0_c + w * (x0_c - x0_u)
    eps_w = eps_c + w * (eps_c - eps_u)
    a_prev = _per_sample(alphas_at(alphas_cumprod, t_prev, dtype), x_t)
    return a_prev.sqrt() * x0_w + (1 - a_prev).sqrt() * eps_w


def consistency_output(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                       prediction: str = "eps", sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """c_skip(t) x_t + c_out(t) x0(out): the consistency function from a raw model output."""
    x_t = x_t.to(dtype)
    x0, _ = x0_and_eps(out.to(dtype), x_t, alphas_at(alphas_cumprod, t, dtype), prediction)
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling, dtype)
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0


def lcd_reference(student_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target_out: torch.Tensor,
                  x_prev: torch.Tensor, t_prev: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "eps",
                  loss: str = "huber", huber_c: float = 0.001, sigma_data: float = 0.5,
                  timestep_scaling: float = 10.0, dtype: torch.dtype = torch.float64,
                  stop_gradient: bool = True) -> torch.Tensor:
    """LCD's loss; differentiable in ``student_out`` only (``x_t``, the target and ``x_prev`` are
    constants) unless ``stop_gradient`` is False (what the loss's gradient depends on: the backward's
    own derivatives)."""
    if loss not in LCD_LOSSES:
        raise ValueError(f"loss: expected one of {list(LCD_LOSSES)}, got {loss!r}")
    student = consistency_output(student_out, x_t.detach() if stop_gradient else x_t, t, alphas_cumprod, prediction,
                                 sigma_data, timestep_scaling, dtype)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not stop_gradient):
        target = consistency_output(target_out, x_prev, t_prev, alphas_cumprod, prediction, sigma_data,
                                    timestep_scaling, dtype)
    if loss == "huber":
        return pseudo_huber_reference(student, target, huber_c, dtype)
    return F.mse_loss(student, target)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) without overflow and exact for large |x| (F.softplus returns x above 20)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def gan_discriminator_reference(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return softplus(-real_logits.to(dtype)).mean() + softplus(fake_logits.to(dtype)).mean()


def gan_generator_reference(fake_logits: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return softplus(-fake_logits.to(dtype)).mean()
