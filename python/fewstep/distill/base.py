"""What every distillation method offers, to a user's own loop and to :class:`fewstep.train.Trainer`.

A method owns its networks (student, and whatever else it trains: a fake score, a discriminator)
and holds the frozen teacher as a :class:`fewstep.Denoiser`. Training is a sequence of *phases*,
each with its own optimizer: LCD has one ("student"); DMD2 has "generator" and "critic" (the fake
score and GAN head), the generator stepping every few critic steps.

One training step of the trainer, for each phase in ``method.phases_at(step)`` in order:

    loss, logs = method.loss(phase, batch, step)     # under autocast; logs are detached tensors
    loss.backward(); clip(method.parameters_of(phase)); optimizer[phase].step(); zero_grad
    method.after_step(phase, step)                    # EMA / target-network updates

A user's own loop does the same with its own optimizers. Losses never call ``.item()`` or
otherwise sync with the device; logs are tensors the trainer reads when it chooses to.

``batch`` is a dict: ``"x0"`` real data (optional for data-free methods), ``"cond"`` a dict of
keyword arguments for the model (optional), ``"noise"`` (optional, methods draw their own).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class DistillationMethod(nn.Module):
    """Base class: subclasses set ``phases`` and implement :meth:`parameters_of`, :meth:`loss`
    and :meth:`sample`."""

    phases: tuple[str, ...] = ("student",)

    def phases_at(self, step: int) -> Sequence[str]:
        """The phases trained at ``step`` (0-based), in order. Default: all, every step."""
        return self.phases

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        """The trainable parameters that ``phase``'s optimizer updates."""
        raise NotImplementedError

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to backpropagate, detached tensors to log) for one phase on one batch."""
        raise NotImplementedError

    def after_step(self, phase: str, step: int) -> None:
        """Called after ``phase``'s optimizer stepped (EMA and target-network updates)."""

    def fsdp_followers(self) -> dict[str, nn.Module]:
        """Untrained modules that follow a trained one parameter by parameter (an EMA target), by
        dotted path. Under FSDP2 the trainer shards them like the trained modules, so that
        ``after_step`` updates them shard by shard (``fewstep.ema_update_`` takes the shards).
        Default: none."""
        return {}

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 1, **cond) -> torch.Tensor:
        """Samples of the distilled generator from ``noise`` in ``steps`` steps."""
        raise NotImplementedError

    def check_phase(self, phase: str) -> None:
        if phase not in self.phases:
            raise ValueError(f"phase: expected one of {list(self.phases)}, got {phase!r}")
