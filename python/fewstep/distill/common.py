"""Pieces the distillation methods share: student/critic setup, the batch's noise and conditions,
the teacher's classifier-free-guided prediction and its DDIM trajectory on any schedule."""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from fewstep.denoiser import Denoiser


def as_denoiser(name: str, model, teacher: Denoiser, prediction: Optional[str] = None) -> Denoiser:
    """``model`` as a trainable :class:`Denoiser`: a Denoiser as given, a plain module wrapped with
    ``prediction`` (default: the teacher's) and the teacher's schedule, ``None`` a trainable copy of
    the teacher's network wrapped the same way."""
    if model is None:
        model = copy.deepcopy(teacher.model)
        model.requires_grad_(True)
    elif isinstance(model, Denoiser):
        if prediction is not None:
            raise ValueError(f"{name}_prediction: given with a Denoiser {name}, which has its own prediction type")
        return model
    if isinstance(model, nn.Module):
        return Denoiser(model, teacher.prediction if prediction is None else prediction, teacher.schedule)
    raise TypeError(f"{name}: expected a fewstep.Denoiser, an nn.Module or None, got {type(model).__name__}")


def device_of(*modules: Optional[nn.Module]) -> torch.device:
    """Where the first of ``modules`` that holds a tensor lives (CPU if none): a method builds its
    step tables there, so a method made of CUDA models needs no ``.to(device)`` of its own."""
    for module in modules:
        if isinstance(module, nn.Module):
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                return tensor.device
    return torch.device("cpu")


def check_teacher(teacher) -> Denoiser:
    if not isinstance(teacher, Denoiser):
        raise TypeError(f"teacher: expected a fewstep.Denoiser, got {type(teacher).__name__}")
    teacher.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def frozen(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Within the block, the modules' parameters build no graph: a loss differentiates through them
    to their inputs without leaving gradients in another phase's parameters."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def batch_noise(batch: dict) -> torch.Tensor:
    """The generator's input noise: ``batch["noise"]``, else fresh noise shaped like ``batch["x0"]``."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch: expected a dict, got {type(batch).__name__}")
    if batch.get("noise") is not None:
        return batch["noise"]
    if batch.get("x0") is not None:
        return torch.randn_like(batch["x0"])
    raise ValueError(f"batch: expected a 'noise' or 'x0' tensor (to size the generator's noise), got keys "
                     f"{sorted(batch)}")


def check_guidance_scale(guidance_scale) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
    return float(guidance_scale)


def conditions(batch: dict, null_cond: Optional[dict], guidance_scale: float) -> tuple[dict, Optional[dict]]:
    """(cond, uncond) model kwargs; uncond is ``batch["uncond"]`` or ``null_cond``, needed when
    guidance_scale != 1 and None otherwise (no unconditional call is made)."""
    cond = batch.get("cond") or {}
    if not isinstance(cond, dict):
        raise TypeError(f"batch['cond']: expected a dict of model kwargs, got {type(cond).__name__}")
    if guidance_scale == 1.0:
        return cond, None
    uncond = batch.get("uncond", null_cond)
    if uncond is None:
        raise ValueError(f"batch: guidance_scale={guidance_scale} needs the unconditional kwargs as "
                         "batch['uncond'] or the method's null_cond argument, got neither")
    if not isinstance(uncond, dict):
        raise TypeError(f"batch['uncond']: expected a dict of model kwargs, got {type(uncond).__name__}")
    return cond, uncond


def guided(teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: dict, uncond: Optional[dict],
           guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (x0, eps) with classifier-free guidance u + w (c - u); both are affine in the
    model output at fixed x_t, so guiding x0 and eps is guiding the output in any parametrization."""
    pred = teacher(x_t, t, **cond)
    if uncond is None:
        return pred.x0, pred.eps
    pred_u = teacher(x_t, t, **uncond)
    return (torch.lerp(pred_u.x0, pred.x0, guidance_scale), torch.lerp(pred_u.eps, pred.eps, guidance_scale))


def timestep(t: int, like: torch.Tensor) -> torch.Tensor:
    """One int64 timestep per sample of ``like``, on its device."""
    return torch.full((like.shape[0],), t, dtype=torch.int64, device=like.device)


def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` descending timesteps from the last train timestep, evenly spaced
    (1000 train timesteps, 4 steps: 999, 749, 499, 249 as in DMD2)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps: expected an int in [1, {num_train_timesteps}], got {num_steps!r}")
    last = num_train_timesteps - 1
    return [last - round(i * num_train_timesteps / num_steps) for i in range(num_steps)]


def check_timesteps(name: str, timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    ts = list(timesteps)
    if not ts or any(isinstance(t, bool) or not isinstance(t, int) for t in ts) \
            or any(not 0 <= t < num_train_timesteps for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{name}: expected strictly decreasing int timesteps in [0, {num_train_timesteps}), "
                         f"got {timesteps!r}")
    return ts


@torch.no_grad()
def ddim_sample(teacher: Denoiser, x: torch.Tensor, timesteps: Sequence[int], cond: dict,
                uncond: Optional[dict] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """The teacher's deterministic DDIM sample from ``x`` at ``timesteps[0]`` (descending):
    x_s = alpha_s x0 + sigma_s eps at each next timestep, x0 at the last. On a flow schedule this is
    the Euler step of the flow ODE."""
    for i, t in enumerate(timesteps):
        x0, eps = guided(teacher, x, timestep(t, x), cond, uncond, guidance_scale)
        if i + 1 == len(timesteps):
            return x0.to(x.dtype)
        alpha, sigma = teacher.schedule.alpha_sigma(timestep(timesteps[i + 1], x), x0)
        x = (alpha * x0 + sigma * eps).to(x.dtype)
    raise ValueError("timesteps: expected at least one timestep, got none")
