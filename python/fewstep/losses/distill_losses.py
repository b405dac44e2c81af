"""The distillation losses besides DMD: pseudo-Huber, LCD's teacher step and loss, the fake score's
denoising loss and the softplus GAN losses, each a fused kernel (C++ CPU and CUDA,
csrc/distill_losses/) with a fused backward that recomputes from the inputs.

Semantics: :mod:`fewstep.reference.distill_losses`. Losses are 0-dim, float32 (float64 for
float64 inputs), computed in float32 for bf16/fp16/fp32 inputs with float64 sums.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from fewstep import _C, _dispatch
from fewstep.losses import distill_losses_checks as checks
from fewstep.reference import distill_losses as ref

if _C is not None:
    def _loss_like(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty((), dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)

    def _grad_like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    # ---- fake implementations: the Python mirror of the C++ checks, then empty outputs ----

    @torch.library.register_fake("fewstep::pseudo_huber_loss")
    def _pseudo_huber_fake(pred, target, c):
        checks.check_pseudo_huber(pred, target, c)
        return _loss_like(pred)

    @torch.library.register_fake("fewstep::pseudo_huber_loss_backward")
    def _pseudo_huber_backward_fake(grad_loss, pred, target, c):
        checks.check_pseudo_huber(pred, target, c)
        return _grad_like(pred)

    @torch.library.register_fake("fewstep::denoising_loss")
    def _denoising_fake(pred, target, weight):
        checks.check_denoising(pred, target, weight)
        return _loss_like(pred), pred.new_empty((pred.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("fewstep::denoising_loss_backward")
    def _denoising_backward_fake(grad_loss, pred, target, weight):
        checks.check_denoising(pred, target, weight)
        return _grad_like(pred)

    @torch.library.register_fake("fewstep::lcd_loss")
    def _lcd_fake(student_out, *args):
        checks.check_lcd(student_out, *args)
        return _loss_like(student_out)

    @torch.library.register_fake("fewstep::lcd_loss_backward")
    def _lcd_backward_fake(grad_loss, student_out, *args):
        checks.check_lcd(student_out, *args)
        return _grad_like(student_out)

    @torch.library.register_fake("fewstep::lcd_teacher_step")
    def _teacher_step_fake(x_t, cond_out, uncond_out, t, t_prev, guidance_scale, guidance_scales, alphas_cumprod,
                           prediction):
        scale = guidance_scale if guidance_scales is None else guidance_scales
        checks.check_lcd_teacher_step(x_t, cond_out, uncond_out, t, t_prev, scale, alphas_cumprod, prediction)
        return _grad_like(x_t)

    @torch.library.register_fake("fewstep::gan_discriminator_loss")
    def _gan_discriminator_fake(real_logits, fake_logits):
        checks.check_gan(real_logits, fake_logits)
        return _loss_like(fake_logits)

    @torch.library.register_fake("fewstep::gan_generator_loss")
    def _gan_generator_fake(fake_logits):
        checks.check_gan(None, fake_logits)
        return _loss_like(fake_logits)

    @torch.library.register_fake("fewstep::softplus_mean_backward")
    def _softplus_mean_backward_fake(grad_loss, logits, sign):
        checks.check_tensor("logits", logits)
        return _grad_like(logits)

    # ---- autograd: the backward ops recompute from the saved inputs (nothing input-sized is stored) ----

    def _neg_if(needed: bool, grad: torch.Tensor) -> Optional[torch.Tensor]:
        return -grad if needed else None  # d/dtarget of a function of (pred - target)

    def _save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))
        ctx.scalars = [None if isinstance(t, torch.Tensor) else t for t in inputs]

    def _pseudo_huber_backward(ctx, grad_loss):
        pred, target = ctx.saved_tensors
        grad = torch.ops.fewstep.pseudo_huber_loss_backward(grad_loss.contiguous(), pred, target, ctx.scalars[2])
        return grad, _neg_if(ctx.needs_input_grad[1], grad), None

    torch.library.register_autograd("fewstep::pseudo_huber_loss", _pseudo_huber_backward, setup_context=_save_inputs)

    def _denoising_setup(ctx, inputs, output):
        pred, target, weight = inputs
        ctx.has_weight = weight is not None
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(pred, target, weight if ctx.has_weight else None, output[1])

    def _denoising_backward(ctx, grad_loss, _grad_sample_means):
        pred, target, weight, sample_means = ctx.saved_tensors
        grad = torch.ops.fewstep.denoising_loss_backward(grad_loss.contiguous(), pred, target, weight)
        grad_weight = None
        if ctx.has_weight and ctx.needs_input_grad[2]:
            grad_weight = (grad_loss.double() * sample_means / sample_means.numel()).to(weight.dtype)
        return grad, _neg_if(ctx.needs_input_grad[1], grad), grad_weight

    torch.library.register_autograd("fewstep::denoising_loss", _denoising_backward, setup_context=_denoising_setup)

    def _lcd_setup(ctx, inputs, output):
        student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod, *scalars = inputs
        ctx.scalars = scalars
        ctx.save_for_backward(student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod)

    def _lcd_backward(ctx, grad_loss):
        grad = torch.ops.fewstep.lcd_loss_backward(grad_loss.contiguous(), *ctx.saved_tensors, *ctx.scalars)
        return (grad,) + (None,) * 11  # the target is under stop-gradient, x_t is data

    torch.library.register_autograd("fewstep::lcd_loss", _lcd_backward, setup_context=_lcd_setup)

    def _teacher_step_setup(ctx, inputs, output):
        x_t, cond_out, uncond_out, t, t_prev, guidance_scale, guidance_scales, alphas_cumprod, prediction = inputs
        ctx.guidance_scale, ctx.prediction = guidance_scale, prediction
        ctx.has_scales = guidance_scales is not None
        ctx.save_for_backward(cond_out, uncond_out, t, t_prev, guidance_scales if ctx.has_scales else None,
                              alphas_cumprod)

    def _teacher_step_backward(ctx, grad_out):
        # x_prev = k_x x_t + (1 + w) k_o cond - w k_o uncond per sample: each gradient is the step
        # itself applied to grad_out in one slot and zeros in the others.
        cond, uncond, t, t_prev, scales, table = ctx.saved_tensors
        zeros = torch.zeros_like(grad_out)

        def step(x, c, u, scale=ctx.guidance_scale, per_sample=scales):
            return torch.ops.fewstep.lcd_teacher_step(x, c, u, t, t_prev, scale, per_sample, table, ctx.prediction)

        need = ctx.needs_input_grad
        grad_x = step(grad_out, zeros, zeros) if need[0] else None
        grad_cond = step(zeros, grad_out, zeros) if need[1] else None
        grad_uncond = step(zeros, zeros, grad_out) if need[2] else None
        grad_scales = None
        if ctx.has_scales and need[6]:  # dx_prev/dw = k_o (cond - uncond)
            k_o_diff = step(zeros, cond - uncond, zeros, 0.0, None)
            grad_scales = (grad_out * k_o_diff).flatten(1).sum(1, dtype=torch.float64).to(scales.dtype)
        return grad_x, grad_cond, grad_uncond, None, None, None, grad_scales, None, None

    torch.library.register_autograd("fewstep::lcd_teacher_step", _teacher_step_backward,
                                    setup_context=_teacher_step_setup)

    def _gan_discriminator_backward(ctx, grad_loss):
        real, fake = ctx.saved_tensors
        g = grad_loss.contiguous()
        grad_real = torch.ops.fewstep.softplus_mean_backward(g, real, -1.0) if ctx.needs_input_grad[0] else None
        grad_fake = torch.ops.fewstep.softplus_mean_backward(g, fake, 1.0) if ctx.needs_input_grad[1] else None
        return grad_real, grad_fake

    torch.library.register_autograd("fewstep::gan_discriminator_loss", _gan_discriminator_backward,
                                    setup_context=_save_inputs)

    def _gan_generator_backward(ctx, grad_loss):
        (fake,) = ctx.saved_tensors
        return torch.ops.fewstep.softplus_mean_backward(grad_loss.contiguous(), fake, -1.0)

    torch.library.register_autograd("fewstep::gan_generator_loss", _gan_generator_backward,
                                    setup_context=_save_inputs)


    # ---- the backward ops are differentiable too (double backward, gradient penalties): their
    # derivatives differentiate the reference's gradient, unfused, as such uses are rare ----

    def _backward_op_setup(ctx, inputs, output):
        ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))
        ctx.is_tensor = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.scalars = [None if isinstance(t, torch.Tensor) else t for t in inputs]

    def _backward_of_backward(loss):
        """For a backward op ``(grad_loss, x, *rest) -> grad_loss * dloss(x, *rest)/dx``."""
        def backward(ctx, upstream):
            saved = iter(ctx.saved_tensors)
            args = [next(saved) if is_tensor else s for is_tensor, s in zip(ctx.is_tensor, ctx.scalars)]
            compute = torch.float64 if args[1].dtype == torch.float64 else torch.float32
            wanted = [i for i, a in enumerate(args)
                      if ctx.needs_input_grad[i] and isinstance(a, torch.Tensor) and a.is_floating_point()]
            out = [None] * len(args)
            with torch.enable_grad():
                leaves = [a.detach().to(compute).requires_grad_(i in wanted or i == 1)
                          if isinstance(a, torch.Tensor) and a.is_floating_point() else a for i, a in enumerate(args)]
                (grad,) = torch.autograd.grad(loss(*leaves[1:]), leaves[1], create_graph=True)
                grads = torch.autograd.grad(leaves[0] * grad, [leaves[i] for i in wanted], upstream.to(compute),
                                            allow_unused=True)
            for i, g in zip(wanted, grads):
                out[i] = torch.zeros_like(args[i]) if g is None else g.to(args[i].dtype)
            return tuple(out)
        return backward

    def _lcd_unstopped(student_out, x_t, t, target_out, x_prev, t_prev, table, prediction, loss, huber_c, sigma_data,
                       timestep_scaling):
        return ref.lcd_reference(student_out, x_t, t, target_out, x_prev, t_prev, table, prediction, loss, huber_c,
                                 sigma_data, timestep_scaling, student_out.dtype, stop_gradient=False)

    _DIFFERENTIATED_LOSSES = {
        "pseudo_huber_loss_backward": lambda pred, target, c: ref.pseudo_huber_reference(pred, target, c, pred.dtype),
        "denoising_loss_backward": lambda pred, target, weight: ref.denoising_reference(pred, target, weight,
                                                                                       pred.dtype)[0],
        "lcd_loss_backward": _lcd_unstopped,
        "softplus_mean_backward": lambda logits, sign: ref.softplus(sign * logits).mean(),
    }
    for op_name, loss_fn in _DIFFERENTIATED_LOSSES.items():
        torch.library.register_autograd(f"fewstep::{op_name}", _backward_of_backward(loss_fn),
                                        setup_context=_backward_op_setup)


def _kernel(op: str, device: torch.device) -> bool:
    """Whether the compiled kernel runs ``op`` (else the reference)."""
    return _dispatch.select(op, device, has_triton=False) != "reference"


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """``mean(sqrt((pred - target)^2 + c^2) - c)``; gradients reach ``pred`` and ``target``."""
    checks.check_tensor("pred", pred)
    if _kernel("pseudo_huber", pred.device):
        return torch.ops.fewstep.pseudo_huber_loss(pred, target, float(c))
    checks.check_pseudo_huber(pred, target, c)
    return ref.pseudo_huber_reference(pred, target, float(c), _compute_dtype(pred))


def denoising(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fake score's denoising loss: ``mean_b weight_b * mean((pred_b - target_b)^2)`` over the
    samples ``b`` of the batch (``weight`` [B], e.g. per-timestep weights; None: all 1)."""
    checks.check_tensor("pred", pred)
    if _kernel("denoising", pred.device):
        return torch.ops.fewstep.denoising_loss(pred, target, weight)[0]
    checks.check_denoising(pred, target, weight)
    return ref.denoising_reference(pred, target, weight, _compute_dtype(pred))[0]


def lcd_teacher_step(x_t: torch.Tensor, cond_out: torch.Tensor, uncond_out: torch.Tensor, t: torch.Tensor,
                     t_prev: torch.Tensor, guidance_scale: Union[float, torch.Tensor], alphas_cumprod: torch.Tensor,
                     prediction: str = "eps") -> torch.Tensor:
    """LCD's CFG-augmented DDIM solver step from ``t`` to ``t_prev`` (int64 [B]) with the teacher's
    conditional and unconditional raw outputs: ``x0_w = x0_c + w (x0_c - x0_u)``, ``eps_w`` likewise,
    ``x_prev = sqrt(a_prev) x0_w + sqrt(1 - a_prev) eps_w`` with ``a = alphas_cumprod[t]`` looked up
    on the device. ``guidance_scale``: a float or a [B] tensor. Returns x_prev in x_t's dtype."""
    checks.check_tensor("x_t", x_t)
    per_sample = isinstance(guidance_scale, torch.Tensor)
    if not per_sample:
        checks.check_finite("guidance_scale", guidance_scale)
    if _kernel("lcd_teacher_step", x_t.device):
        return torch.ops.fewstep.lcd_teacher_step(x_t, cond_out, uncond_out, t, t_prev,
                                                  0.0 if per_sample else float(guidance_scale),
                                                  guidance_scale if per_sample else None, alphas_cumprod, prediction)
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
    checks.check_tensor("student_out", student_out)
    if _kernel("lcd", student_out.device):
        return torch.ops.fewstep.lcd_loss(student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod, prediction,
                                          loss, float(huber_c), float(sigma_data), float(timestep_scaling))
    checks.check_lcd(student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod, prediction, loss, huber_c,
                     sigma_data, timestep_scaling)
    return ref.lcd_reference(student_out, x_t, t, target_out.detach(), x_prev.detach(), t_prev, alphas_cumprod,
                             prediction, loss, float(huber_c), float(sigma_data), float(timestep_scaling),
                             _compute_dtype(student_out))


def gan_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-real_logits) + mean softplus(fake_logits)`` (logits of any shapes)."""
    checks.check_tensor("real_logits", real_logits)
    checks.check_tensor("fake_logits", fake_logits)
    if _kernel("gan_discriminator", fake_logits.device):
        return torch.ops.fewstep.gan_discriminator_loss(real_logits, fake_logits)
    checks.check_gan(real_logits, fake_logits)
    return ref.gan_discriminator_reference(real_logits, fake_logits, _compute_dtype(fake_logits))


def gan_generator(fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean softplus(-fake_logits)`` (logits of any shape)."""
    checks.check_tensor("fake_logits", fake_logits)
    if _kernel("gan_generator", fake_logits.device):
        return torch.ops.fewstep.gan_generator_loss(fake_logits)
    checks.check_gan(None, fake_logits)
    return ref.gan_generator_reference(fake_logits, _compute_dtype(fake_logits))
