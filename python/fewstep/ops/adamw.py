"""``fewstep.ops.adamw_step_``: one fused multi-tensor AdamW step, optionally with an EMA of the
updated parameters in the same pass (used by :class:`fewstep.optim.FusedAdamW`).

Semantics: :mod:`fewstep.reference.adamw`. Backend: ``torch.ops.fewstep.adamw_step_`` (C++ CPU
and CUDA kernels, csrc/adamw/), or the reference. In place and not differentiable.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fewstep import _C, _dispatch
from fewstep.reference.adamw import adamw_step_reference

if _C is not None:
    @torch.library.register_fake("fewstep::adamw_step_")
    def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, ema_params, step, lr, beta1, beta2, eps,
                         weight_decay, ema_decay):
        return None


@torch.no_grad()
def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], ema_params: Sequence[torch.Tensor] = (), *, step: int,
                lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
                ema_decay: float = 0.0) -> None:
    """One AdamW update of every parameter (torch.optim.AdamW's arithmetic), then, if
    ``ema_params`` is not empty, ``ema <- lerp(ema, param, 1 - ema_decay)``: one launch per 512
    parameters on CUDA.

    ``params``/``grads``: contiguous, fp16/bf16/fp32/fp64, equal dtypes pairwise; ``exp_avgs``,
    ``exp_avg_sqs`` and ``ema_params``: fp32 (fp64 for fp64 parameters) of the same shapes.
    ``step`` is the 1-based count of this update (bias corrections)."""
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(ema_params), int(step), float(lr),
            float(beta1), float(beta2), float(eps), float(weight_decay), float(ema_decay))
    if not args[0]:
        return
    if _dispatch.select("adamw_step_", args[0][0].device, has_triton=False) == "reference":
        adamw_step_reference(*args)
    else:
        torch.ops.fewstep.adamw_step_(*args)
