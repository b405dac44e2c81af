"""Condition-embedding perturbation (CEP) for diffusion training.

Chen et al. 2024, "Slight Corruption in Pre-training Data Makes Better Diffusion Models": during
training only, the text-encoder output ``c`` is replaced by ``c + delta`` with

* ``"uniform"``:  delta ~ U(-gamma/sqrt(d), gamma/sqrt(d))
* ``"gaussian"``: delta ~ N(0, (gamma/sqrt(d))^2)

where ``d`` is the embedding (last) dimension.
"""
from __future__ import annotations

import math

import torch

from fewstep import _checks

PERTURBATION_KINDS = ("uniform", "gaussian")


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) \
            or gamma < 0:
        raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
    return float(gamma)


def _check_kind(kind) -> str:
    if kind not in PERTURBATION_KINDS:
        raise ValueError(f"kind: expected one of {list(PERTURBATION_KINDS)}, got {kind!r}")
    return kind


def _check_embedding(c) -> None:
    _checks.check_tensor("c", c)
    if c.ndim == 0:
        raise ValueError("c: expected a tensor whose last dimension is the embedding dimension, "
                         "got a 0-dim tensor")


def perturb_condition(c: torch.Tensor, gamma: float = 1.0, kind: str = "uniform",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``c`` plus CEP noise scaled by ``gamma / sqrt(c.shape[-1])``.

    The noise is drawn in float32 (so a seeded ``generator`` gives the same draw for any dtype of
    ``c``) and added at float32 or wider before rounding back to ``c.dtype``, so bf16/fp16
    embeddings get the intended scale rather than noise quantised before the add. The result is a
    new tensor on ``c``'s device (``generator`` must live there too); ``c`` is never modified and
    gradients flow through it unchanged.
    """
    _check_embedding(c)
    gamma = _check_gamma(gamma)
    kind = _check_kind(kind)
    if gamma == 0.0:
        return c.clone()
    scale = gamma / math.sqrt(c.shape[-1])
    if kind == "uniform":
        # 2u - 1 is exact in float32 for u in [0, 1), so |delta| <= scale holds exactly.
        noise = torch.rand(c.shape, generator=generator, dtype=torch.float32, device=c.device)
        noise.mul_(2.0).sub_(1.0).mul_(scale)
    else:
        noise = torch.randn(c.shape, generator=generator, dtype=torch.float32, device=c.device)
        noise.mul_(scale)
    return (c + noise).to(c.dtype)


class ConditionPerturbation(torch.nn.Module):
    """CEP as a module: perturbs condition embeddings in training mode, identity in eval mode.

    Place it between the text encoder and the denoiser; ``model.eval()`` switches it off.
    """

    def __init__(self, gamma: float = 1.0, kind: str = "uniform",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)
        self.kind = _check_kind(kind)
        self.generator = generator

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return c
        return perturb_condition(c, self.gamma, self.kind, self.generator)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, kind={self.kind!r}"
