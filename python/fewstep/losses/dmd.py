"""``fewstep.losses.dmd``: DMD / DMD2's distribution-matching generator loss in fused kernels.

Semantics: :mod:`fewstep.reference.dmd_loss`. Backend: ``torch.ops.fewstep.dmd_loss`` (C++ CPU
and CUDA, csrc/dmd_loss/), which returns the loss and dloss/dx together; the backward is one
scaling of that saved gradient.
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
        return x.new_empty((), dtype=loss_dtype), torch.empty_like(x, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _backward(ctx, grad_loss, _grad_of_grad):
        (dx,) = ctx.saved_tensors
        return (grad_loss.to(dx.dtype) * dx if grad_loss is not None else None), None, None, None, None

    torch.library.register_autograd("fewstep::dmd_loss", _backward, setup_context=_setup_context)


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
