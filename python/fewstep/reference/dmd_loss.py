"""Reference semantics of the DMD / DMD2 generator loss (``fewstep::dmd_loss``).

With ``real = uncond + w (cond - uncond)`` when the real score's unconditional x0 is given, per
sample b: ``norm_b = mean |x - real|``, ``g = (fake - real) / norm_b`` (= (p_real - p_fake)/norm
with p = x - x0; non-finite entries -> 0), ``loss = 0.5 mean(g^2)`` and ``dloss/dx = g / numel``.
The scores' predictions are constants of the loss (DMD's stop-gradient): no gradient reaches them.
"""
from __future__ import annotations

from typing import Optional

import torch


def dmd_loss_reference(x: torch.Tensor, real: torch.Tensor, real_uncond: Optional[torch.Tensor],
                       guidance_scale: float, fake: torch.Tensor,
                       dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dloss/dx) computed in ``dtype``."""
    x, real, fake = x.to(dtype), real.to(dtype), fake.to(dtype)
    if real_uncond is not None:
        uncond = real_uncond.to(dtype)
        real = uncond + guidance_scale * (real - uncond)
    dims = tuple(range(1, x.dim()))
    norm = (x - real).abs().mean(dim=dims, keepdim=True)
    g = (fake - real) / norm
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return 0.5 * g.square().mean(), g / x.numel()
