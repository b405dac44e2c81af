"""Guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models").

Stage 1 — a w-conditioned student x_eta(z_t, w) learns the classifier-free-guided teacher in one
forward pass: target x_w = (1 + w) x_c(z_t) - w x_u(z_t), w ~ U[w_min, w_max], t uniform over the
train timesteps, z_t = alpha_t x + sigma_t eps from data.

Stage 2 — progressive distillation (Salimans & Ho 2022), one round per halving: with the teacher
(a frozen copy of the student) on N deterministic DDIM steps and the student on N/2, the student's
single step t -> t'' matches the teacher's two steps t -> t' -> t''. The student's x-prediction
target that makes its DDIM step land on the teacher's z_{t''} is

    x~ = (z_{t''} - (sigma_{t''}/sigma_t) z_t) / (alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t).

:meth:`GuidedDistillation.next_round` halves the step count and freezes the current student as
the next teacher (the first call ends stage 1).

Timesteps are the teacher's discrete ones: the N-step grid is
:func:`fewstep.distill.common.spaced_timesteps` (T - 1 - round(i T / N), i = 0..N-1), ended by the
clean sample (alpha = 1, sigma = 0); the N/2-step grid is every other point of it, and sampling
(:func:`fewstep.distill.common.ddim_sample`) uses the same grid.

Weighting: omega(lambda_t) = max(SNR_t, 1) on the x-space error ("truncated SNR", Salimans & Ho
§4): at low noise it is the eps-space error, at high noise (SNR < 1) the x-space error, so neither
end dominates; it is what both papers' x-prediction losses use.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fewstep import losses
from fewstep.denoiser import Denoiser
from fewstep.distill import _guidance
from fewstep.distill.base import DistillationMethod
from fewstep.distill.common import batch_noise, check_teacher, conditions, ddim_sample, device_of, guided, spaced_timesteps


class GuidedDistillation(DistillationMethod):
    """Guided distillation of ``teacher`` (a :class:`fewstep.Denoiser` on a VP schedule, called with
    ``batch["cond"]`` and the unconditional kwargs ``batch["uncond"]`` or ``null_cond``) into
    ``student`` (a Denoiser, a module read with the teacher's prediction type, or None for a
    trainable copy of the teacher, the paper's initialization), called as
    ``model(x_t, t, **cond, <w_embedding_kwarg>=embedding(w))``.

    ``w_embedding``: size of the sinusoidal embedding of 1000 w given to the student (needed
    unless w_min == w_max). ``num_steps``: the DDIM steps of the stage-1 student, which is the
    first progressive round's teacher. Use :meth:`guidance_loss` and :meth:`progressive_loss` in
    your own loop, or :meth:`loss`, which runs the current stage.
    """

    phases = ("student",)

    def __init__(self, teacher: Denoiser, student=None, *, w_min: float = 0.0, w_max: float = 4.0,
                 null_cond: Optional[dict] = None, w_embedding: Optional[int] = None,
                 w_embedding_kwarg: str = "timestep_cond", num_steps: int = 64):
        super().__init__()
        abar = _guidance.vp_alphas_cumprod("teacher", teacher)
        self.teacher = check_teacher(teacher)
        self.student = _guidance.vp_student(student, teacher, abar)
        if self.student.model is teacher.model:
            raise ValueError("student: expected a module of its own (a copy of the teacher's), got the teacher's")
        self.w_min, self.w_max = _guidance.check_guidance_range(w_min, w_max)
        self.w_embedding = _guidance.check_embedding_dim(w_embedding)
        if self.w_embedding is None and self.w_min != self.w_max:
            raise ValueError("w_embedding: expected the size of the student's w-embedding when w_min < w_max "
                             "(the student must know w), got None")
        self.num_train_timesteps = teacher.schedule.num_train_timesteps
        spaced_timesteps(self.num_train_timesteps, num_steps)  # checks num_steps
        self.num_steps = num_steps
        self.null_cond = null_cond
        self.w_embedding_kwarg = w_embedding_kwarg
        self.progressive_teacher: Optional[Denoiser] = None
        self.stage = 1
        abar = abar.to(device_of(self.student, teacher))
        # alpha and sigma at timestep + 1: index 0 is the clean end of every grid
        self.register_buffer("alphas", torch.cat([abar.new_ones(1), abar.sqrt()]), persistent=False)
        self.register_buffer("sigmas", torch.cat([abar.new_zeros(1), (1 - abar).sqrt()]), persistent=False)
        self.register_buffer("weights", (abar / (1 - abar)).clamp_min(1.0), persistent=False)
        self.register_buffer("teacher_grid", torch.zeros(0, dtype=torch.int64, device=abar.device), persistent=False)

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        self.check_phase(phase)
        return [p for p in self.student.model.parameters() if p.requires_grad]

    def next_round(self) -> None:
        """Halve the step count; the current student, frozen, becomes the teacher (stage 2)."""
        if self.num_steps < 2 or self.num_steps % 2:
            raise ValueError(f"num_steps: expected an even count to halve, got {self.num_steps}")
        student = self.student.model
        if isinstance(student, DistributedDataParallel):  # the trainer's wrapper: copy the network, not the wrapper
            student = student.module
        frozen = copy.deepcopy(student).requires_grad_(False)
        self.progressive_teacher = Denoiser(frozen, self.student.prediction, self.student.schedule)
        self.teacher_grid = torch.tensor(spaced_timesteps(self.num_train_timesteps, self.num_steps) + [-1],
                                         device=self.alphas.device)
        self.num_steps //= 2
        self.stage = 2

    def _student_kwargs(self, cond: dict, w: torch.Tensor) -> dict:
        if self.w_embedding is None:
            return cond
        return {**cond, self.w_embedding_kwarg: _guidance.guidance_embedding(w, self.w_embedding)}

    def _per_sample(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t + 1].to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    def guidance_loss(self, x0: torch.Tensor, cond: Optional[dict] = None, uncond: Optional[dict] = None,
                      noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None,
                      w: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 1 on data ``x0``: weighted MSE between the student's x-prediction and the guided
        teacher's. ``noise``, ``t`` (int64 [B]) and ``w`` ([B]) are drawn when not given."""
        batch = {"x0": x0, "noise": noise, "cond": cond}
        if uncond is not None:
            batch["uncond"] = uncond
        return self._guidance_loss(batch, t, w)

    def _guidance_loss(self, batch, t, w):
        x0 = _guidance.data(batch)
        noise = batch_noise(batch)
        cond, uncond = conditions(batch, self.null_cond, 1.0 + self.w_max)
        size, device = x0.shape[0], x0.device
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (size,), device=device)
        if w is None:
            w = _guidance.draw_guidance(size, self.w_min, self.w_max, device)
        z_t = self.teacher.add_noise(x0, noise, t)
        with torch.no_grad():  # guided(): u + s (c - u) with s = 1 + w is (1 + w) c - w u
            compute = torch.float64 if x0.dtype == torch.float64 else torch.float32
            scale = (1 + w.to(compute)).view((-1,) + (1,) * (x0.dim() - 1))
            target, _ = guided(self.teacher, z_t, t, cond, uncond, scale)
        x0_student = self.student(z_t, t, **self._student_kwargs(cond, w)).x0
        loss = losses.denoising(x0_student, target.to(x0_student.dtype),
                                weight=self.weights[t].to(x0_student.dtype))
        return loss, {"loss": loss.detach()}

    def progressive_loss(self, x0: torch.Tensor, cond: Optional[dict] = None, noise: Optional[torch.Tensor] = None,
                         step_index: Optional[torch.Tensor] = None,
                         w: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 2 on data ``x0``: the student's step ``step_index`` (int64 [B] in [0, num_steps), 0 the
        first, from the last train timestep) matches the teacher's two. ``noise``, ``step_index`` and
        ``w`` are drawn when not given."""
        if self.progressive_teacher is None:
            raise RuntimeError("progressive_loss: no progressive teacher yet; call next_round() after stage 1")
        return self._progressive_loss({"x0": x0, "noise": noise, "cond": cond or {}}, step_index, w)

    def _progressive_loss(self, batch, step_index, w):
        x0 = _guidance.data(batch)
        noise = batch_noise(batch)
        cond, _ = conditions(batch, None, 1.0)
        size, device = x0.shape[0], x0.device
        if step_index is None:
            step_index = torch.randint(0, self.num_steps, (size,), device=device)
        if w is None:
            w = _guidance.draw_guidance(size, self.w_min, self.w_max, device)
        t, t_mid, t_end = (self.teacher_grid[2 * step_index + i] for i in range(3))
        kwargs = self._student_kwargs(cond, w)
        z_t = self.teacher.add_noise(x0, noise, t)
        with torch.no_grad():
            z_mid = self._ddim_step(self.progressive_teacher(z_t, t, **kwargs), t_mid)
            z_end = self._ddim_step(self.progressive_teacher(z_mid, t_mid, **kwargs), t_end)
            zt = z_t.to(z_end.dtype)
            ratio = self._per_sample(self.sigmas, t_end, zt) / self._per_sample(self.sigmas, t, zt)
            target = (z_end - ratio * zt) / (self._per_sample(self.alphas, t_end, zt)
                                             - ratio * self._per_sample(self.alphas, t, zt))
        x0_student = self.student(z_t, t, **kwargs).x0
        loss = losses.denoising(x0_student, target, weight=self.weights[t].to(x0_student.dtype))
        return loss, {"loss": loss.detach()}

    def _ddim_step(self, pred, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM: z_next = alpha_next x0 + sigma_next eps (t_next = -1: the clean sample)."""
        return self._per_sample(self.alphas, t_next, pred.x0) * pred.x0 + \
            self._per_sample(self.sigmas, t_next, pred.x0) * pred.eps

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_phase(phase)
        if self.stage == 1:
            return self._guidance_loss(batch, None, None)
        return self._progressive_loss(batch, None, None)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: Optional[int] = None, w: Optional[float] = None,
               **cond) -> torch.Tensor:
        """Deterministic DDIM of the student on the ``steps``-step grid (default: the current
        ``num_steps``) at guidance ``w`` (default: the middle of [w_min, w_max])."""
        steps = self.num_steps if steps is None else steps
        w = (self.w_min + self.w_max) / 2 if w is None else w
        kwargs = self._student_kwargs(cond, torch.full((noise.shape[0],), float(w), device=noise.device))
        return ddim_sample(self.student, noise, spaced_timesteps(self.num_train_timesteps, steps), kwargs)
