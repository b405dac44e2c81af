"""``fewstep.ema_update_``: one fused multi-tensor EMA update of a model's parameters.

Semantics: :mod:`fewstep.reference.ema`. Backend: ``torch.ops.fewstep.ema_update_`` (C++ CPU and
CUDA kernels, csrc/ema/), or the reference.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fewstep import _C, _dispatch
from fewstep.reference.ema import ema_update_reference

if _C is not None:
    @torch.library.register_fake("fewstep::ema_update_")
    def _ema_update_fake(ema, params, decay):
        return None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update_(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * param`` for every pair, in one launch per device.

    ``ema_params`` may be fp32 (or fp16/bf16) copies of fp16/bf16/fp32 ``params``; pairs must
    have equal shapes and be contiguous. Accepts tensors or ``nn.Parameter`` iterables, e.g.
    ``fewstep.ema_update_(ema_model.parameters(), model.parameters(), 0.999)``. FSDP2 parameters
    (DTensors) update shard by shard: both modules sharded alike (``fully_shard`` on each), each
    rank updates its own shards, with no communication."""
    # no_grad: parameters update in place; a DTensor's local shard is a view of its storage
    ema_list, param_list = [_local(t) for t in ema_params], [_local(t) for t in params]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay: expected a float in [0, 1], got {type(decay).__name__}")
    if not ema_list and not param_list:
        return
    if _dispatch.select("ema_update_", ema_list[0].device, has_triton=False) == "reference":
        if len(ema_list) != len(param_list):
            raise ValueError(f"params: expected {len(ema_list)} tensors (one per ema tensor), got {len(param_list)}")
        ema_update_reference(ema_list, param_list, float(decay))
    else:
        torch.ops.fewstep.ema_update_(ema_list, param_list, float(decay))
