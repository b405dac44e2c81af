"""Pieces shared by the methods that distill a range of guidance scales into a w-conditioned
student (LCD, guided distillation): the scale range w ~ U[w_min, w_max] (CFG x_c + w (x_c - x_u),
0 = unguided), the w-embedding given to the student, and the discrete VP schedule's table.
Batch noise, conditions and the guided teacher are in :mod:`fewstep.distill.common`."""
from __future__ import annotations

import math
from typing import Optional

import torch

from fewstep.denoiser import Denoiser, Prediction
from fewstep.distill.common import as_denoiser

VP_PREDICTIONS = ("eps", "x0", "v")


def check_guidance_range(w_min, w_max) -> tuple[float, float]:
    for name, value in (("w_min", w_min), ("w_max", w_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if not 0 <= w_min <= w_max:
        raise ValueError(f"w_min, w_max: expected 0 <= w_min <= w_max, got w_min={w_min!r}, w_max={w_max!r}")
    return float(w_min), float(w_max)


def draw_guidance(batch: int, w_min: float, w_max: float, device) -> torch.Tensor:
    """w ~ U[w_min, w_max] per sample (float32, on the device: no host traffic)."""
    return torch.rand(batch, device=device) * (w_max - w_min) + w_min


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of 1000·w ([B] -> [B, dim]): sines then cosines of geometrically spaced
    frequencies 10000^(-i / (dim/2 - 1)), zero-padded to an odd ``dim`` (LCM's ``timestep_cond``)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = (1000.0 * w.float())[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def check_embedding_dim(w_embedding: Optional[int]) -> Optional[int]:
    if w_embedding is not None and (isinstance(w_embedding, bool) or not isinstance(w_embedding, int)
                                    or w_embedding < 4):
        raise ValueError(f"w_embedding: expected None or an int >= 4 (the embedding's size), got {w_embedding!r}")
    return w_embedding


def data(batch: dict) -> torch.Tensor:
    x0 = batch.get("x0") if isinstance(batch, dict) else None
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or not x0.is_floating_point():
        got = list(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"batch['x0']: expected a floating tensor [B, ...] of data, got {got}")
    return x0


def vp_alphas_cumprod(name: str, denoiser: Denoiser) -> torch.Tensor:
    """The denoiser's discrete alphas_cumprod (float64), read through the schedule's public interface."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"{name}: expected a fewstep.Denoiser, got {type(denoiser).__name__}")
    schedule = denoiser.schedule
    if not schedule.variance_preserving:
        raise ValueError(f"{name}: expected a Denoiser on a VPSchedule (the method is defined on the DDPM "
                         f"discrete schedule), got {type(schedule).__name__}")
    steps = schedule.num_train_timesteps
    alpha, _ = schedule.alpha_sigma(torch.arange(steps), torch.empty(steps, dtype=torch.float64))
    return alpha.reshape(-1).square()


def raw_output(pred: Prediction, prediction: str) -> torch.Tensor:
    """The model output in its own parametrization (exactly the output for eps and x0)."""
    return getattr(pred, prediction)


def vp_student(student, teacher: Denoiser, alphas_cumprod: torch.Tensor) -> Denoiser:
    """The student as a Denoiser (:func:`fewstep.distill.common.as_denoiser`) on the teacher's schedule."""
    student = as_denoiser("student", student, teacher)
    if student.prediction not in VP_PREDICTIONS:
        raise ValueError(f"student: expected a prediction in {list(VP_PREDICTIONS)}, got {student.prediction!r}")
    if not torch.equal(vp_alphas_cumprod("student", student), alphas_cumprod):
        raise ValueError("student: expected a Denoiser on the teacher's schedule (the same alphas_cumprod), "
                         "got a different one")
    return student
