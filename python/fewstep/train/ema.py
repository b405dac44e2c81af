"""EMA weights the trainer keeps: fp32 (fp64 for fp64) copies of a module's trainable parameters, updated with
:func:`fewstep.ema_update_` once per step, or by the optimizer itself where it can (``fold_ema``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import fewstep
from fewstep.train.distributed import gather_like, local_tensor, shard_like


def fold_ema(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], decay: float) -> Optional[list[torch.Tensor]]:
    """The hook through which an optimizer takes over an EMA: when ``optimizer`` keeps EMA copies
    of its parameters and updates them in its own step (``fewstep.optim.FusedAdamW``: one pass
    over the parameters instead of two) — ``ema_parameters()`` lists them, in parameter order, for
    the param groups whose ``"ema_decay"`` is set — and every one of ``params`` is in a group with
    ``ema_decay == decay``, the copies of ``params`` in their order; otherwise None, and the trainer
    runs :func:`fewstep.ema_update_` itself."""
    if not callable(getattr(optimizer, "ema_parameters", None)):
        return None
    groups = [g for g in optimizer.param_groups if g.get("ema_decay") is not None]
    position = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    group_decay = {id(p): g["ema_decay"] for g in groups for p in g["params"]}
    if any(group_decay.get(id(p)) != decay for p in params):
        return None
    copies = optimizer.ema_parameters()
    return [copies[position[id(p)]] for p in params]


class EMA:
    """The EMA of one module's trainable parameters (this rank's shards under FSDP2)."""

    def __init__(self, name: str, module: nn.Module, decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema[{name!r}]: expected a decay in [0, 1], got {decay!r}")
        self.name, self.decay = name, float(decay)
        self.named = [(key, p) for key, p in module.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError(f"ema[{name!r}]: expected a module with trainable parameters, got none")
        self.params = [p for _, p in self.named]
        # fp32 averages of fp16/bf16/fp32 weights (updates far below a bf16 ulp add up), fp64 of fp64
        self.copies = [local_tensor(p).detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
                       for p in self.params]
        self.folded = False

    def fold_into(self, optimizer: torch.optim.Optimizer) -> bool:
        """Lets ``optimizer`` update this EMA in its step when it can (see :func:`fold_ema`)."""
        copies = fold_ema(optimizer, self.params, self.decay)
        if copies is not None:
            with torch.no_grad():
                for own, theirs in zip(self.copies, copies):
                    theirs.copy_(own)
            self.copies, self.folded = copies, True
        return self.folded

    @torch.no_grad()
    def update(self) -> None:
        if not self.folded:
            fewstep.ema_update_(self.copies, [local_tensor(p) for p in self.params], self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole EMA tensors by parameter name (a collective under FSDP2: every rank calls it)."""
        return {key: gather_like(copy, p) for (key, p), copy in zip(self.named, self.copies)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [key for key, _ in self.named if key not in state]
        if missing:
            raise KeyError(f"ema[{self.name!r}]: checkpoint lacks EMA weights for {missing}")
        for (key, p), copy in zip(self.named, self.copies):
            copy.copy_(shard_like(state[key], p))
