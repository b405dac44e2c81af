"""BOOT (Gu et al. 2023, "BOOT: Data-free Distillation of Denoising Diffusion Models with
Bootstrapping"): a student g(eps, t) that, from the noise eps alone, predicts the *signal* of the
teacher's deterministic DDIM trajectory started at eps. No data: the teacher only ever sees the
student's own states.

Derivation of the bootstrapping target (any schedule x_t = alpha_t x0 + sigma_t eps):

The signal of a state x_t on the trajectory from eps is y_t = (x_t - sigma_t eps) / alpha_t, i.e.
x_t = alpha_t y_t + sigma_t eps. One DDIM step from t to s < t with the teacher's prediction
x0_hat = f(x_t, t) (classifier-free guided) is

    x_s = alpha_s x0_hat + sigma_s eps_hat,   eps_hat = (x_t - alpha_t x0_hat) / sigma_t.

With x_t = alpha_t y_t + sigma_t eps, eps_hat = (alpha_t / sigma_t)(y_t - x0_hat) + eps, so

    y_s = (x_s - sigma_s eps) / alpha_s = x0_hat + (sigma_s alpha_t)/(alpha_s sigma_t) (y_t - x0_hat)
        = y_t + delta (x0_hat - y_t),   delta = 1 - exp(lambda_t - lambda_s),  lambda = log(alpha/sigma).

(The eps terms cancel exactly.) As s < t has lambda_s > lambda_t, delta is in (0, 1). Note the sign:
``1 - exp(lambda_s - lambda_t)`` would be negative. In the limit this is the linear ODE
dy/dlambda = f(alpha y + sigma eps) - y, and the DDIM step is its exponential integrator with f
held at t. So the student is trained with

    loss = || g(eps, s) - sg[g(eps, t) + delta (f(x_hat_t, t) - g(eps, t))] ||^2 / delta^2,
    x_hat_t = alpha_t sg[g(eps, t)] + sigma_t eps.

Weighting: the residual divided by delta is (g(eps, s) - g(eps, t))/delta - (f - g(eps, t)), the
finite-difference residual of the ODE above, whose size does not depend on the step; 1/delta^2
("inv_delta_sq", the default) therefore weighs every interval of the grid by the same ODE residual.
"uniform" weighs the raw signal error instead (small intervals then count little). Either way the
fixed point is the teacher's DDIM trajectory on the grid.

Boundary condition at the first grid timestep T: the first DDIM step from x_T = eps gives
y ~= f(eps, T) (delta -> 1 as alpha_T -> 0), so g(eps, T) is trained towards sg[f(eps, T)] (weight 1,
delta = 1). Each sample of a batch draws one of the grid's N intervals or the boundary
uniformly, so one step costs one student forward with gradient, one without and one teacher
evaluation (two with CFG), with no host sync.

Timesteps are the teacher's discrete (int) timesteps from the last train timestep down to 0; on a
flow schedule the last train timestep keeps alpha > 0 (t = T itself would make y undefined).

Sampling: ``g(eps, t_last)`` is the one-step sample. ``steps > 1`` lets the student jump along the
trajectory to the second of ``steps`` evenly spaced timesteps and the teacher finish with DDIM
from there (1 student + steps - 1 teacher evaluations): the student carries no denoiser of its own
to re-noise into, so more steps refine with the teacher.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fewstep import losses
from fewstep.denoiser import Denoiser
from fewstep.distill.base import DistillationMethod
from fewstep.distill.common import (as_denoiser, batch_noise, check_guidance_scale, check_teacher, device_of,
                                    check_timesteps, conditions, ddim_sample, guided, spaced_timesteps, timestep)

WEIGHTINGS = ("inv_delta_sq", "uniform")


class BOOT(DistillationMethod):
    """BOOT around a frozen ``teacher``.

    Args:
        teacher: the many-step model as a :class:`fewstep.Denoiser`; frozen here.
        student: g(eps, t, **cond), as a Denoiser whose x0 prediction at input eps is the signal
            y_t (a Denoiser copy of the teacher starts exact at the boundary; an ``"x0"`` or ``"v"``
            Denoiser keeps y well conditioned at large t); a plain module is wrapped with the
            teacher's prediction and schedule; ``None``: a trainable copy of the teacher.
        student_prediction: the prediction type given to a plain-module student or the teacher's
            copy (default: the teacher's); "x0" or "v" keep y well conditioned near T.
        guidance_scale, null_cond: classifier-free guidance of the teacher (``batch["uncond"]`` or
            ``null_cond`` give the unconditional kwargs).
        num_intervals / timesteps: the bootstrapping grid (descending; default ``num_intervals``
            evenly spaced intervals from the last train timestep to 0).
        weighting: ``"inv_delta_sq"`` (default) or ``"uniform"``; see the module docstring.
    """

    phases = ("student",)

    def __init__(self, teacher: Denoiser, student: Optional[nn.Module] = None, *,
                 student_prediction: Optional[str] = None, guidance_scale: float = 1.0,
                 null_cond: Optional[dict] = None, num_intervals: int = 32,
                 timesteps: Optional[Sequence[int]] = None, weighting: str = "inv_delta_sq"):
        super().__init__()
        self.teacher = check_teacher(teacher)
        self.student = as_denoiser("student", student, self.teacher, student_prediction)
        self.guidance_scale = check_guidance_scale(guidance_scale)
        if null_cond is not None and not isinstance(null_cond, dict):
            raise TypeError(f"null_cond: expected a dict of model kwargs or None, got {type(null_cond).__name__}")
        self.null_cond = null_cond
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        n = self.teacher.schedule.num_train_timesteps
        if timesteps is None:
            if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or not 1 <= num_intervals < n:
                raise ValueError(f"num_intervals: expected an int in [1, {n}), got {num_intervals!r}")
            timesteps = spaced_timesteps(n, num_intervals) + [0]
        grid = check_timesteps("timesteps", timesteps, n)
        if len(grid) < 2:
            raise ValueError(f"timesteps: expected at least two timesteps (one interval), got {timesteps!r}")
        self.timesteps = grid
        self.register_buffer("grid", torch.tensor(grid, dtype=torch.int64, device=device_of(self.student, self.teacher)),
                             persistent=False)

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        self.check_phase(phase)
        return [p for p in self.student.parameters() if p.requires_grad]

    def signal(self, noise: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The student's y_t for the trajectory from ``noise`` (t: one timestep per sample)."""
        return self.student(noise, t, **cond).x0

    def loss(self, phase: str, batch: dict, step: int):
        self.check_phase(phase)
        return self.bootstrap_loss(batch)

    def bootstrap_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond = conditions(batch, self.null_cond, self.guidance_scale)
        eps = batch_noise(batch)
        grid = self.grid.to(eps.device)
        j = torch.randint(0, len(self.timesteps), (eps.shape[0],), device=eps.device)  # 0: boundary
        t, s = grid[(j - 1).clamp(min=0)], grid[j]
        with torch.no_grad():
            y_t = self.signal(eps, t, **cond)
            target, delta = self.bootstrap_target(eps, y_t, t, s, j == 0, cond, uncond)
            weight = delta.flatten().reciprocal().square() if self.weighting == "inv_delta_sq" else None
        y_s = self.signal(eps, s, **cond)
        loss = losses.denoising(y_s, target.to(y_s.dtype), weight)
        return loss, {"loss_boot": loss.detach()}

    @torch.no_grad()
    def bootstrap_target(self, eps: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                         boundary: torch.Tensor, cond: dict, uncond: Optional[dict]):
        """(target for y_s, delta [B, 1, ...]): y_t + delta (f(x_hat_t, t) - y_t) with
        x_hat_t = alpha_t y_t + sigma_t eps; where ``boundary``, f(eps, t) and delta = 1."""
        alpha_t, sigma_t = self.teacher.schedule.alpha_sigma(t, y_t)
        alpha_s, sigma_s = self.teacher.schedule.alpha_sigma(s, y_t)
        boundary = boundary.view_as(alpha_t)
        eps_c = eps.to(y_t.dtype)
        x_hat = torch.where(boundary, eps_c, alpha_t * y_t + sigma_t * eps_c)
        x0_teacher, _ = guided(self.teacher, x_hat.to(eps.dtype), t, cond, uncond, self.guidance_scale)
        delta = torch.where(boundary, 1.0, 1 - (alpha_t * sigma_s) / (sigma_t * alpha_s))
        return y_t + delta * (x0_teacher.to(y_t.dtype) - y_t), delta

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 1, **cond) -> torch.Tensor:
        """One step: the student's signal at the grid's last timestep. ``steps > 1``: the student's
        state at the second of ``steps`` evenly spaced timesteps, then the teacher's DDIM (with the
        method's guidance; ``null_cond`` as the unconditional kwargs)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        if steps == 1:
            return self.signal(noise, timestep(self.timesteps[-1], noise), **cond).to(noise.dtype)
        ts = spaced_timesteps(self.teacher.schedule.num_train_timesteps, steps)[1:]
        t = timestep(ts[0], noise)
        y = self.signal(noise, t, **cond)
        alpha, sigma = self.teacher.schedule.alpha_sigma(t, y)
        x = (alpha * y + sigma * noise.to(y.dtype)).to(noise.dtype)
        uncond = None if self.guidance_scale == 1.0 else conditions({}, self.null_cond, self.guidance_scale)[1]
        return ddim_sample(self.teacher, x, ts, cond, uncond, self.guidance_scale)
