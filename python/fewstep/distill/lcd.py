"""Latent consistency distillation (LCM, Luo et al. 2023; LCM-LoRA), as diffusers'
``train_lcm_distill_*`` scripts.

One training step on data x0:
  1. a start timestep t = t_{n+k} on the DDIM solver grid [T/N - 1, 2T/N - 1, ..., T - 1] and
     t_prev = t - k T/N (clamped at 0); x_t = add_noise(x0, eps, t); w ~ U[w_min, w_max];
  2. the teacher's CFG-augmented DDIM step t -> t_prev (:func:`fewstep.losses.lcd_teacher_step`,
     x0_w = x0_c + w (x0_c - x0_u), eps likewise) gives x_prev;
  3. the loss (:func:`fewstep.losses.lcd`) is pseudo-Huber (or L2) between the student's
     consistency function c_skip(t) x_t + c_out(t) x0_student(x_t, t, w) and the target
     network's at (x_prev, t_prev, w), the latter under stop-gradient. The target is an EMA of the
     student (decay 0.95) or, in LCM-LoRA, the student itself.

Sampling is LCM's multistep consistency sampling (:class:`fewstep.samplers.LCMSampler`) on the
same grid. Everything stays on the device: no host syncs in the loss.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from fewstep import losses, samplers
from fewstep.denoiser import Denoiser
from fewstep.distill import _guidance
from fewstep.distill.base import DistillationMethod
from fewstep.distill.common import batch_noise, check_teacher, conditions, device_of
from fewstep.distill.lora import has_lora, lora_disabled
from fewstep.ops.ema import ema_update_

TARGETS = ("ema", "self")
LOSSES = ("huber", "l2")
SAMPLER_PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class LCD(DistillationMethod):
    """Latent consistency distillation of ``teacher`` (a :class:`fewstep.Denoiser` on a VP schedule)
    into ``student`` (a Denoiser, a module read with the teacher's prediction type, or None for a
    trainable copy of the teacher, LCM's initialization).

    - ``num_ddim_timesteps`` (N) and ``skip`` (k): the solver grid and how many of its intervals one
      teacher step spans (the paper's skipping step is k T/N train timesteps).
    - ``w_min``, ``w_max``: the CFG scale range (x0_c + w (x0_c - x0_u); 0 = no guidance, and then
      the teacher is called once). The unconditional kwargs: ``batch["uncond"]`` or ``null_cond``.
    - ``w_embedding``: the size of the sinusoidal embedding of 1000 w given to the student as the
      kwarg ``w_embedding_kwarg`` (LCM: the UNet's ``time_cond_proj_dim``, 256); None gives the
      student no w (LCM-LoRA: guidance is then baked in at the drawn scales).
    - ``target``: "ema" (an EMA copy of the student, ``ema_decay``) or "self" (LCM-LoRA).
    - LoRA mode: :func:`fewstep.distill.add_lora` on the student; only requires-grad parameters
      train. If the student is the teacher's own module, the teacher runs with adapters disabled.
    """

    phases = ("student",)

    def __init__(self, teacher: Denoiser, student=None, *, num_ddim_timesteps: int = 50, skip: int = 1,
                 w_min: float = 5.0, w_max: float = 15.0, null_cond: Optional[dict] = None,
                 w_embedding: Optional[int] = None, w_embedding_kwarg: str = "timestep_cond", target: str = "ema",
                 ema_decay: float = 0.95, loss: str = "huber", huber_c: float = 0.001,
                 timestep_scaling: float = 10.0):
        super().__init__()
        abar = _guidance.vp_alphas_cumprod("teacher", teacher)
        steps = teacher.schedule.num_train_timesteps
        if isinstance(num_ddim_timesteps, bool) or not isinstance(num_ddim_timesteps, int) or \
                not 1 <= num_ddim_timesteps <= steps:
            raise ValueError(f"num_ddim_timesteps: expected an int in [1, {steps}] (the teacher's train "
                             f"timesteps), got {num_ddim_timesteps!r}")
        if isinstance(skip, bool) or not isinstance(skip, int) or not 1 <= skip <= num_ddim_timesteps:
            raise ValueError(f"skip: expected an int in [1, {num_ddim_timesteps}] (num_ddim_timesteps), got {skip!r}")
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {list(TARGETS)}, got {target!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {list(LOSSES)}, got {loss!r}")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay: expected a number in [0, 1], got {ema_decay!r}")
        if isinstance(huber_c, bool) or not isinstance(huber_c, (int, float)) or not huber_c > 0:
            raise ValueError(f"huber_c: expected a number > 0, got {huber_c!r}")
        student = _guidance.vp_student(student, teacher, abar)
        self.shares_teacher = student.model is teacher.model
        if self.shares_teacher:
            if not has_lora(student.model):
                raise ValueError("student: is the teacher's own module without LoRA adapters, so training it "
                                 "would change the teacher; add adapters (fewstep.distill.add_lora) or pass a copy")
            object.__setattr__(self, "teacher", teacher)  # not a second submodule: its weights are the student's
        else:
            self.teacher = check_teacher(teacher)
        self.student = student
        self.ema_target = (Denoiser(copy.deepcopy(student.model).requires_grad_(False), student.prediction,
                                    student.schedule) if target == "ema" else None)
        self.w_min, self.w_max = _guidance.check_guidance_range(w_min, w_max)
        self.null_cond = null_cond
        self.w_embedding = _guidance.check_embedding_dim(w_embedding)
        self.w_embedding_kwarg = w_embedding_kwarg
        self.ema_decay = float(ema_decay)
        self.loss_type, self.huber_c, self.timestep_scaling = loss, float(huber_c), float(timestep_scaling)
        self.num_ddim_timesteps, self.skip = num_ddim_timesteps, skip
        step_ratio = steps // num_ddim_timesteps
        self.solver_step = skip * step_ratio
        device = device_of(student, teacher)
        self.register_buffer("alphas_cumprod", abar.to(device), persistent=False)
        self.register_buffer("ddim_timesteps", torch.arange(1, num_ddim_timesteps + 1, device=device) * step_ratio - 1,
                             persistent=False)
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        self.sampler = samplers.LCMSampler(num_train_timesteps=steps, trained_betas=betas.tolist(),
                                           original_inference_steps=num_ddim_timesteps,
                                           prediction_type=SAMPLER_PREDICTIONS[student.prediction],
                                           timestep_scaling=self.timestep_scaling)

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        self.check_phase(phase)
        return [p for p in self.student.model.parameters() if p.requires_grad]

    def _student_kwargs(self, cond: dict, w: torch.Tensor) -> dict:
        if self.w_embedding is None:
            return cond
        return {**cond, self.w_embedding_kwarg: _guidance.guidance_embedding(w, self.w_embedding)}

    def _teacher(self, x_t, t, cond):
        if self.shares_teacher:
            with lora_disabled(self.student.model):
                return self.teacher(x_t, t, **cond)
        return self.teacher(x_t, t, **cond)

    def consistency_loss(self, x0: torch.Tensor, cond: Optional[dict] = None, uncond: Optional[dict] = None,
                         noise: Optional[torch.Tensor] = None, solver_index: Optional[torch.Tensor] = None,
                         w: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LCD's loss on data ``x0`` for a user's loop. ``noise``, ``solver_index`` (the start
        timestep's index on the solver grid, int64 [B]) and ``w`` ([B]) are drawn when not given."""
        batch = {"x0": x0, "noise": noise, "cond": cond}
        if uncond is not None:
            batch["uncond"] = uncond
        return self._loss(batch, solver_index, w)

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_phase(phase)
        return self._loss(batch, None, None)

    def _loss(self, batch, solver_index, w):
        x0 = _guidance.data(batch)
        noise = batch_noise(batch)
        cond, uncond = conditions(batch, self.null_cond, 1.0 + self.w_max)
        size, device = x0.shape[0], x0.device
        if solver_index is None:
            solver_index = torch.randint(0, self.num_ddim_timesteps, (size,), device=device)
        t = self.ddim_timesteps[solver_index]
        t_prev = (t - self.solver_step).clamp_min(0)
        if w is None:
            w = _guidance.draw_guidance(size, self.w_min, self.w_max, device)
        x_t = self.teacher.add_noise(x0, noise, t)

        with torch.no_grad():
            teacher_cond = self._teacher(x_t, t, cond)
            cond_out = _guidance.raw_output(teacher_cond, self.teacher.prediction)
            uncond_out = (cond_out if uncond is None else
                          _guidance.raw_output(self._teacher(x_t, t, uncond), self.teacher.prediction))
            x_t = teacher_cond.x_t  # in the compute dtype, as every prediction
            x_prev = losses.lcd_teacher_step(x_t, cond_out, uncond_out, t, t_prev, w.to(x_t.dtype),
                                             self.alphas_cumprod, prediction=self.teacher.prediction)
            student_kwargs = self._student_kwargs(cond, w)
            target = self.student if self.ema_target is None else self.ema_target
            target_out = _guidance.raw_output(target(x_prev, t_prev, **student_kwargs), target.prediction)

        student_out = _guidance.raw_output(self.student(x_t, t, **student_kwargs), self.student.prediction)
        loss = losses.lcd(student_out, x_t, t, target_out, x_prev, t_prev, self.alphas_cumprod,
                          prediction=self.student.prediction, loss=self.loss_type, huber_c=self.huber_c,
                          timestep_scaling=self.timestep_scaling)
        return loss, {"loss": loss.detach()}

    def fsdp_followers(self) -> dict[str, nn.Module]:
        return {} if self.ema_target is None else {"ema_target.model": self.ema_target.model}

    def after_step(self, phase: str, step: int) -> None:
        self.check_phase(phase)
        if self.ema_target is None:
            return
        pairs = [(e, p) for e, p in zip(self.ema_target.model.parameters(), self.student.model.parameters())
                 if p.requires_grad]
        ema_update_([e for e, _ in pairs], [p for _, p in pairs], self.ema_decay)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 4, w: Optional[float] = None,
               generator: Optional[torch.Generator] = None, **cond) -> torch.Tensor:
        """LCM multistep sampling from ``noise`` in ``steps`` steps; ``w`` (default the middle of
        [w_min, w_max]) is what the student's w-embedding is given."""
        w = (self.w_min + self.w_max) / 2 if w is None else w
        size = noise.shape[0]
        kwargs = self._student_kwargs(cond, torch.full((size,), float(w), device=noise.device))
        self.sampler.set_timesteps(steps)
        x = noise
        for i, t in enumerate(self.sampler.timesteps.tolist()):  # host ints: no device traffic
            t_batch = torch.full((size,), t, device=noise.device, dtype=torch.long)
            out = _guidance.raw_output(self.student(x, t_batch, **kwargs), self.student.prediction)
            x = self.sampler.step(out.to(x.dtype), i, x, generator=generator)
        return x
