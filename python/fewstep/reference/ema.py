"""Reference semantics of the multi-tensor EMA update (``fewstep::ema_update_``).

For every pair: ``ema <- torch.lerp(ema, param, 1 - decay)`` computed in float32 (float64 for
float64 pairs) and rounded once to ema's dtype. torch.lerp's two forms (``ema + w (param - ema)``
for w < 0.5, ``param - (1 - w)(param - ema)`` otherwise) make decay 1 keep ema and decay 0 copy
param exactly.
"""
from __future__ import annotations

import torch


def ema_update_reference(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    weight = 1.0 - decay
    for e, p in zip(ema, params):
        compute = torch.float64 if e.dtype == torch.float64 else torch.float32
        e.copy_(torch.lerp(e.to(compute), p.to(compute), weight))
