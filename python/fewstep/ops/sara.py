"""SaRA's sparse ops: gradient gather and multi-tensor sparse AdamW.

Semantics: :mod:`fewstep.reference.sara`. Backends: ``torch.ops.fewstep.sara_gather_`` and
``torch.ops.fewstep.sara_adamw_step_`` (C++ CPU and CUDA kernels, csrc/sara/), or the
reference. Both ops mutate their outputs in place and return nothing; they are not
differentiable (they run inside gradient hooks and the optimizer step).
"""
from __future__ import annotations

import torch

from fewstep import _C, _dispatch
from fewstep.reference.sara import sara_adamw_step_reference, sara_gather_reference

if _C is not None:
    @torch.library.register_fake("fewstep::sara_gather_")
    def _sara_gather_fake(grad, out, selection, chunk_offsets, fmt, scale):
        return None

    @torch.library.register_fake("fewstep::sara_adamw_step_")
    def _sara_adamw_step_fake(weights, exp_avg, exp_avg_sq, master, grad, layout, selection, chunk_offsets,
                              lr, beta1, beta2, eps, weight_decay, step):
        return None


def sara_gather_(grad: torch.Tensor, out: torch.Tensor, selection: torch.Tensor, chunk_offsets: torch.Tensor,
                 fmt: int, scale: float = 1.0) -> None:
    """``out += scale * grad[selected]`` (fp32 ``out`` of k entries, compact order)."""
    if _dispatch.select("sara_gather_", grad.device, has_triton=False) == "reference":
        sara_gather_reference(grad, out, selection, chunk_offsets, fmt, scale)
    else:
        torch.ops.fewstep.sara_gather_(grad, out, selection, chunk_offsets, fmt, scale)


def sara_adamw_step_(weights: list[torch.Tensor], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     master: torch.Tensor, grad: torch.Tensor, layout: torch.Tensor, selection: torch.Tensor,
                     chunk_offsets: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, step: int) -> None:
    """One AdamW update of the selected entries of every tensor in ``weights`` (one launch)."""
    args = (weights, exp_avg, exp_avg_sq, master, grad, layout, selection, chunk_offsets,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))
    if _dispatch.select("sara_adamw_step_", exp_avg.device, has_triton=False) == "reference":
        sara_adamw_step_reference(*args)
    else:
        torch.ops.fewstep.sara_adamw_step_(*args)
