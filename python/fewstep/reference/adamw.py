"""Reference semantics of the multi-tensor AdamW step (``fewstep::adamw_step_``).

torch.optim.AdamW's single-tensor update (``maximize=False``, ``amsgrad=False``), operation by
operation, on each parameter ``x`` with gradient ``g`` and moments ``m``, ``v`` kept in float32
(float64 for float64 parameters), the arithmetic done in that dtype and ``x`` rounded once to
its own dtype::

    x <- x (1 - lr wd);  m <- lerp(m, g, 1 - beta1);  v <- v beta2 + (1 - beta2) g g
    x <- x - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

then, when EMA tensors are given, ``fewstep.ema_update_`` of them towards the stored ``x``.
"""
from __future__ import annotations

import math

import torch

from fewstep.reference.ema import ema_update_reference


def adamw_step_reference(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                         exp_avg_sqs: list[torch.Tensor], ema_params: list[torch.Tensor], step: int, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float, ema_decay: float) -> None:
    neg_step_size = -lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    for x, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        xc, gc = x.to(m.dtype), g.to(m.dtype)
        xc.mul_(1 - lr * weight_decay)
        m.lerp_(gc, 1 - beta1)
        v.mul_(beta2).addcmul_(gc, gc, value=1 - beta2)
        xc.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=neg_step_size)
        x.copy_(xc)
    if ema_params:
        ema_update_reference(list(ema_params), list(params), ema_decay)
