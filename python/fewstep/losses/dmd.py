"""``fewstep.losses.dmd``: DMD / DMD2's distribution-matching generator loss in fused kernels.

Semantics: :mod:`fewstep.reference.dmd_loss`. Backend: ``torch.ops.fewstep.dmd_loss`` (C++ CPU
and CUDA, csrc/dmd_loss/) returns the loss and the per-sample norms; its backward,
``torch.ops.fewstep.dmd_loss_backward``, recomputes the normalized gradient from the scores'
predictions in one pass, so the head allocates nothing input-sized but x's gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from fewstep import _C, _dispatch
from fewstep.reference.dmd_loss import dmd_loss_reference

if _C is not None:
    @torch.library.register_fake("fewstep::dmd_loss")
    def _dmd_loss_fake(x, real, real_uncond, guidance_scale, fake):
        loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((), dtype=loss_dtype), x.new_empty((x.shape[0],), dtype=torch.float64)

    @torch.library.register_fake("fewstep::dmd_loss_backward")
    def _dmd_loss_backward_fake(grad_loss, real, real_uncond, guidance_scale, fake, norm):
        return torch.empty_like(fake, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        _, real, real_uncond, guidance_scale, fake = inputs
        ctx.guidance_scale = guidance_scale
        ctx.has_uncond = real_uncond is not None
        # references to the inputs and the [B] norms: nothing input-sized is kept
        ctx.save_for_backward(real, real_uncond if ctx.has_uncond else real, fake, output[1])

    def _backward(ctx, grad_loss, _grad_norm):
        real, uncond, fake, norm = ctx.saved_tensors
        dx = torch.ops.fewstep.dmd_loss_backward(grad_loss.contiguous(), real, uncond if ctx.has_uncond else None,
                                                 ctx.guidance_scale, fake, norm)
        return dx, None, None, None, None

    torch.library.register_autograd("fewstep::dmd_loss", _backward, setup_context=_setup_context)

    def _setup_backward_context(ctx, inputs, output):
        grad_loss, real, real_uncond, guidance_scale, fake, norm = inputs
        ctx.guidance_scale = guidance_scale
        ctx.has_uncond = real_uncond is not None
        ctx.save_for_backward(grad_loss, real, real_uncond if ctx.has_uncond else real, fake, norm)

    def _backward_of_backward(ctx, grad_dx):
        # dx = grad_loss * (fake - real) / (norm * numel) where finite: linear in each input.
        grad_loss, real, uncond, fake, norm = ctx.saved_tensors
        compute = torch.float64 if fake.dtype == torch.float64 else torch.float32
        w = ctx.guidance_scale
        n = norm.to(compute).view((-1,) + (1,) * (fake.dim() - 1))
        guided = real.to(compute)
        if ctx.has_uncond:
            guided = uncond.to(compute) + w * (guided - uncond.to(compute))
        diff = fake.to(compute) - guided
        finite = torch.isfinite(diff / n)
        upstream = grad_dx.to(compute) * finite / fake.numel()
        d_fake = upstream * grad_loss.to(compute) / n
        dims = tuple(range(1, fake.dim()))
        d_grad_loss = (upstream * torch.where(finite, diff / n, 0)).sum()
        d_norm = -(upstream * torch.where(finite, diff, 0)).sum(dims) * grad_loss.to(compute) / n.flatten() ** 2
        d_real = -d_fake * w if ctx.has_uncond else -d_fake
        d_uncond = -d_fake * (1 - w) if ctx.has_uncond else None
        return (d_grad_loss.to(grad_loss.dtype), d_real.to(real.dtype),
                None if d_uncond is None else d_uncond.to(uncond.dtype), None, d_fake.to(fake.dtype),
                d_norm.to(norm.dtype))

    torch.library.register_autograd("fewstep::dmd_loss_backward", _backward_of_backward,
                                    setup_context=_setup_backward_context)


def dmd(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, *,
        x0_real_uncond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """DMD2's generator loss of the generator output ``x``, given the real (teacher) score's
    x0 prediction and the fake score's, both on the same noised ``x``. Pass the real score's
    unconditional x0 and ``guidance_scale`` to fuse its CFG combine. Returns a 0-dim loss (fp32;
    fp64 for fp64 inputs) whose gradient w.r.t. ``x`` is ``(p_real - p_fake) / mean|p_real| / numel``."""
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
        raise TypeError(f"guidance_scale: expected a float, got {type(guidance_scale).__name__}")
    if _dispatch.select("dmd_loss", x.device, has_triton=False) == "reference":
        if x0_real.shape != x.shape or x0_fake.shape != x.shape:
            raise ValueError(f"x0_real, x0_fake: expected shape {list(x.shape)} (the shape of x), got "
                             f"{list(x0_real.shape)} and {list(x0_fake.shape)}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        x_c = x.to(compute)
        uncond = None if x0_real_uncond is None else x0_real_uncond.detach()
        _, dx = dmd_loss_reference(x_c.detach(), x0_real.detach(), uncond, float(guidance_scale), x0_fake.detach(),
                                   compute)
        # DMD's own form: 0.5 mean((x - sg(x - g))^2), whose gradient is g / numel
        return 0.5 * torch.nn.functional.mse_loss(x_c, (x_c - dx * x.numel()).detach())
    loss, _ = torch.ops.fewstep.dmd_loss(x, x0_real, x0_real_uncond, float(guidance_scale), x0_fake)
    return loss
