"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation") and plain DMD (Yin et al.
2023): a few-step generator trained so that its samples' distribution matches the teacher's.

Generator phase: the generator's sample x (from noise; for a multi-step student, from a state of
its own few-step chain reached by *backward simulation*) is noised at t ~ U{t_min..t_max}; the real
score (the frozen teacher, with CFG) and the fake score (a copy trained on generator samples) both
predict x0 there, and :func:`fewstep.losses.dmd` moves x along (x0_real - x0_fake) normalised by
mean|x - x0_real|. Optional terms: a GAN generator loss (softplus) from a classifier head on the
fake score's features, and DMD's regression loss (MSE here) on the teacher's noise-image pairs.

Critic phase: the fake score learns to denoise detached generator samples (its own prediction type
against the exact target, :func:`fewstep.losses.denoising`), plus the GAN discriminator loss on
real data (``batch["x0"]``) against generator samples when the head is on. The critic steps every
step, the generator every ``dfake_gen_update_ratio`` steps (two time-scale update).

No loss syncs with the device: timesteps are drawn on the tensors' device, the backward-simulation
depth on the host's CPU generator.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from fewstep import losses
from fewstep.denoiser import Denoiser
from fewstep.distill.base import DistillationMethod
from fewstep.distill.common import (as_denoiser, batch_noise, check_guidance_scale, check_teacher,
                                    check_timesteps, conditions, ddim_sample, frozen, spaced_timesteps, timestep)


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    return float(value)


class DMD2(DistillationMethod):
    """DMD2 around a frozen ``teacher`` (the real score).

    Args:
        teacher: the many-step model as a :class:`fewstep.Denoiser`; frozen here.
        generator: the student (a Denoiser, or a module wrapped with the teacher's prediction and
            schedule); ``None``: a trainable copy of the teacher (DMD2's initialisation).
        fake_score: the critic's score model; ``None``: a trainable copy of the teacher.
        generator_prediction: what the generator's network predicts when it is a plain module or
            the teacher's copy (default: the teacher's type). From pure noise at the last timestep an
            eps output is divided by alpha_T (~0.006 on DDPM's linear schedule, 156x): there "x0"
            (or "v") keeps the one-step generator well conditioned.
        guidance_scale: CFG scale of the real score; != 1 needs unconditional kwargs, as
            ``batch["uncond"]`` or ``null_cond``.
        num_steps / timesteps: the student's timesteps (descending; default ``num_steps`` evenly
            spaced from the last train timestep: 1 step -> [999], 4 -> [999, 749, 499, 249]).
        t_min, t_max: range of the DMD noise level (default 2% and 98% of the train timesteps).
        critic_t_min, critic_t_max: range of the fake score's training timesteps (default all).
        dfake_gen_update_ratio: the generator steps at steps 0, r, 2r, ...; the critic every step.
        gan_head: classifier mapping the fake score's features to logits (``None``: no GAN loss).
        gan_feature_layer: submodule of the fake score (or its name in ``fake_score.model``) whose
            output feeds the head; ``None``: the fake score's x0 prediction.
        gan_generator_weight, gan_discriminator_weight: weights of the softplus GAN losses.
        regression_weight: weight of the regression MSE between the generator's one-step sample of
            a teacher noise and the teacher's many-step sample of it (DMD's regression loss).
        regression_pairs: (noise, x0) or (noise, x0, cond) teacher pairs (:meth:`teacher_pairs`
            makes them; cond tensors have one row per pair); ``batch["regression_noise"]`` /
            ``batch["regression_x0"]`` (with ``batch["regression_cond"]``) take precedence.
    """

    phases = ("generator", "critic")

    def __init__(self, teacher: Denoiser, generator: Optional[nn.Module] = None,
                 fake_score: Optional[nn.Module] = None, *, generator_prediction: Optional[str] = None,
                 guidance_scale: float = 1.0, null_cond: Optional[dict] = None, num_steps: int = 1, timesteps: Optional[Sequence[int]] = None,
                 t_min: Optional[int] = None, t_max: Optional[int] = None, critic_t_min: int = 0,
                 critic_t_max: Optional[int] = None, dfake_gen_update_ratio: int = 5,
                 gan_head: Optional[nn.Module] = None, gan_feature_layer: Union[str, nn.Module, None] = None,
                 gan_generator_weight: float = 3e-3, gan_discriminator_weight: float = 1e-2,
                 regression_weight: float = 0.0,
                 regression_pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        super().__init__()
        self.teacher = check_teacher(teacher)
        self.generator = as_denoiser("generator", generator, self.teacher, generator_prediction)
        self.fake_score = as_denoiser("fake_score", fake_score, self.teacher)
        self.guidance_scale = check_guidance_scale(guidance_scale)
        if null_cond is not None and not isinstance(null_cond, dict):
            raise TypeError(f"null_cond: expected a dict of model kwargs or None, got {type(null_cond).__name__}")
        self.null_cond = null_cond
        n = self.teacher.schedule.num_train_timesteps
        self.timesteps = (spaced_timesteps(n, num_steps) if timesteps is None
                          else check_timesteps("timesteps", timesteps, n))
        self.t_min, self.t_max = self._range("t_min", t_min, round(0.02 * n), "t_max", t_max, round(0.98 * n) - 1, n)
        self.critic_t_min, self.critic_t_max = self._range("critic_t_min", critic_t_min, 0,
                                                           "critic_t_max", critic_t_max, n - 1, n)
        if isinstance(dfake_gen_update_ratio, bool) or not isinstance(dfake_gen_update_ratio, int) \
                or dfake_gen_update_ratio < 1:
            raise ValueError(f"dfake_gen_update_ratio: expected an int >= 1, got {dfake_gen_update_ratio!r}")
        self.dfake_gen_update_ratio = dfake_gen_update_ratio

        self.gan_head = gan_head
        self.gan_generator_weight = _check_weight("gan_generator_weight", gan_generator_weight)
        self.gan_discriminator_weight = _check_weight("gan_discriminator_weight", gan_discriminator_weight)
        self._gan_layer = self._feature_layer(gan_feature_layer) if gan_head is not None else None
        if gan_head is None and gan_feature_layer is not None:
            raise ValueError("gan_feature_layer: given without gan_head; pass the classifier head too")
        self._features: Optional[torch.Tensor] = None
        self._capture = False

        self.regression_weight = _check_weight("regression_weight", regression_weight)
        self._regression_cond_tensors: list[str] = []  # kwargs stored as buffers regression_cond_<name>
        self._regression_cond_values: dict = {}         # other kwargs, as given
        if regression_pairs is None:
            self.regression_noise = self.regression_x0 = None
        else:
            self._store_pairs(regression_pairs)

    def _store_pairs(self, pairs) -> None:
        ok = isinstance(pairs, (tuple, list)) and len(pairs) in (2, 3) \
            and all(isinstance(p, torch.Tensor) for p in pairs[:2]) and pairs[0].shape == pairs[1].shape \
            and (len(pairs) == 2 or isinstance(pairs[2], dict))
        if not ok:
            raise ValueError("regression_pairs: expected (noise, x0) or (noise, x0, cond), two tensors of one shape "
                             "[N, ...] and a dict of model kwargs whose tensors have N rows")
        self.register_buffer("regression_noise", pairs[0], persistent=False)
        self.register_buffer("regression_x0", pairs[1], persistent=False)
        for key, value in (pairs[2] if len(pairs) == 3 else {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape[0] != pairs[0].shape[0]:
                    raise ValueError(f"regression_pairs: cond[{key!r}] expected {pairs[0].shape[0]} rows (one per "
                                     f"pair), got shape {list(value.shape)}")
                self.register_buffer(f"regression_cond_{key}", value, persistent=False)
                self._regression_cond_tensors.append(key)
            else:
                self._regression_cond_values[key] = value

    @staticmethod
    def _range(lo_name, lo, lo_default, hi_name, hi, hi_default, n) -> tuple[int, int]:
        lo = lo_default if lo is None else lo
        hi = hi_default if hi is None else hi
        for name, v in ((lo_name, lo), (hi_name, hi)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise ValueError(f"{name}: expected an int timestep in [0, {n}), got {v!r}")
        if lo > hi:
            raise ValueError(f"{lo_name}, {hi_name}: expected {lo_name} <= {hi_name}, got {lo} > {hi}")
        return lo, hi

    def _feature_layer(self, layer) -> Optional[nn.Module]:
        if not isinstance(self.gan_head, nn.Module):
            raise TypeError(f"gan_head: expected an nn.Module, got {type(self.gan_head).__name__}")
        if layer is None:
            return None
        if isinstance(layer, str):
            if not isinstance(self.fake_score.model, nn.Module):
                raise TypeError("gan_feature_layer: a submodule name needs the fake score's model to be an nn.Module")
            layer = self.fake_score.model.get_submodule(layer)
        if not any(layer is m for m in self.fake_score.modules()):
            raise ValueError("gan_feature_layer: expected a submodule of the fake score (or its name), got a "
                             f"{type(layer).__name__} outside it")
        layer.register_forward_hook(self._keep_features)
        return layer

    def _keep_features(self, module, inputs, output) -> None:
        if self._capture:
            self._features = output[0] if isinstance(output, (tuple, list)) else output

    def _gan_logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict):
        """(head logits on the fake score's features at x_t, the fake score's prediction)."""
        self._capture = True
        try:
            pred = self.fake_score(x_t, t, **cond)
        finally:
            self._capture = False
        features = pred.x0 if self._gan_layer is None else self._features
        self._features = None
        return self.gan_head(features), pred

    # ----------------------------------------------------------------- schedule and parameters
    def phases_at(self, step: int) -> Sequence[str]:
        return self.phases if step % self.dfake_gen_update_ratio == 0 else ("critic",)

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        self.check_phase(phase)
        modules = [self.generator] if phase == "generator" else [self.fake_score, self.gan_head]
        return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]

    def loss(self, phase: str, batch: dict, step: int):
        self.check_phase(phase)
        return self.generator_loss(batch) if phase == "generator" else self.critic_loss(batch)

    # ----------------------------------------------------------------- generator
    def _simulate(self, noise: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation: (the generator's input at step k, its timestep) for k drawn uniformly
        from the student's steps, reached by rolling the generator k steps from ``noise`` without
        gradient and re-noising each x0 with fresh noise, as at sampling time."""
        k = int(torch.randint(len(self.timesteps), ())) if len(self.timesteps) > 1 else 0  # CPU RNG: no sync
        x = noise
        with torch.no_grad():
            for i in range(k):
                x0 = self.generator(x, timestep(self.timesteps[i], x), **cond).x0
                x = self.generator.add_noise(x0, torch.randn_like(x0), timestep(self.timesteps[i + 1], x))
                x = x.to(noise.dtype)
        return x, timestep(self.timesteps[k], x)

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond = conditions(batch, self.null_cond, self.guidance_scale)
        x_in, t_in = self._simulate(batch_noise(batch), cond)
        x = self.generator(x_in, t_in, **cond).x0

        t = torch.randint(self.t_min, self.t_max + 1, (x.shape[0],), device=x.device)
        x_t = self.teacher.add_noise(x.detach(), torch.randn_like(x), t)
        with torch.no_grad():
            x0_real = self.teacher(x_t, t, **cond).x0
            x0_real_uncond = None if uncond is None else self.teacher(x_t, t, **uncond).x0
            x0_fake = self.fake_score(x_t, t, **cond).x0
        loss_dmd = losses.dmd(x, x0_real, x0_fake, x0_real_uncond=x0_real_uncond, guidance_scale=self.guidance_scale)
        loss, logs = loss_dmd, {"loss_dmd": loss_dmd.detach()}

        if self.gan_head is not None and self.gan_generator_weight > 0:
            t_gan = torch.randint(0, self.teacher.schedule.num_train_timesteps, (x.shape[0],), device=x.device)
            with frozen(self.fake_score, self.gan_head):  # gradient to x only, none left in the critic
                logits, _ = self._gan_logits(self.teacher.add_noise(x, torch.randn_like(x), t_gan), t_gan, cond)
            loss_gan = losses.gan_generator(logits)
            loss = loss + self.gan_generator_weight * loss_gan
            logs["loss_gan_g"] = loss_gan.detach()

        if self.regression_weight > 0:
            noise, target, pair_cond = self._regression_batch(batch, x.shape[0], cond)
            pred = self.generator(noise, timestep(self.timesteps[0], noise), **pair_cond).x0
            loss_reg = losses.denoising(pred, target.to(pred.dtype))
            loss = loss + self.regression_weight * loss_reg
            logs["loss_regression"] = loss_reg.detach()
        logs["loss_generator"] = loss.detach()
        return loss, logs

    def _regression_batch(self, batch: dict, size: int, cond: dict):
        """(noise, teacher sample, the generator's kwargs for them): the batch's pairs (with
        ``batch["regression_cond"]``, else the batch's cond), else ``size`` stored pairs drawn on
        their device, with their own cond."""
        if batch.get("regression_noise") is not None and batch.get("regression_x0") is not None:
            return batch["regression_noise"], batch["regression_x0"], batch.get("regression_cond", cond)
        if self.regression_noise is None:
            raise ValueError("batch: regression_weight > 0 needs teacher pairs, as batch['regression_noise'] and "
                             "batch['regression_x0'] or the regression_pairs argument, got neither")
        idx = torch.randint(self.regression_noise.shape[0], (size,), device=self.regression_noise.device)
        pair_cond = dict(self._regression_cond_values)
        pair_cond.update({key: getattr(self, f"regression_cond_{key}")[idx] for key in self._regression_cond_tensors})
        return self.regression_noise[idx], self.regression_x0[idx], pair_cond

    @torch.no_grad()
    def teacher_pairs(self, noise: torch.Tensor, steps: int = 50, **cond):
        """(noise, the teacher's ``steps``-step DDIM sample from it with the real score's CFG, cond):
        DMD's regression pairs, to pass as ``regression_pairs``."""
        uncond = None if self.guidance_scale == 1.0 else conditions({}, self.null_cond, self.guidance_scale)[1]
        ts = spaced_timesteps(self.teacher.schedule.num_train_timesteps, steps)
        return noise, ddim_sample(self.teacher, noise, ts, cond, uncond, self.guidance_scale), cond

    # ----------------------------------------------------------------- critic
    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, _ = conditions(batch, self.null_cond, 1.0)
        with torch.no_grad():
            x_in, t_in = self._simulate(batch_noise(batch), cond)
            x = self.generator(x_in, t_in, **cond).x0
        t = torch.randint(self.critic_t_min, self.critic_t_max + 1, (x.shape[0],), device=x.device)
        eps = torch.randn_like(x)
        x_t = self.teacher.add_noise(x, eps, t)
        if self.gan_head is None:
            pred = self.fake_score(x_t, t, **cond)
        else:
            logits_fake, pred = self._gan_logits(x_t, t, cond)
        output, target = _native_output_and_target(self.fake_score.prediction, pred, x, eps)
        loss_denoise = losses.denoising(output, target)
        loss, logs = loss_denoise, {"loss_denoising": loss_denoise.detach()}

        if self.gan_head is not None and self.gan_discriminator_weight > 0:
            real = batch.get("x0")
            if real is None:
                raise ValueError(f"batch: the GAN head needs real data as batch['x0'], got keys {sorted(batch)}")
            t_real = torch.randint(0, self.teacher.schedule.num_train_timesteps, (real.shape[0],), device=real.device)
            real = real.to(x.dtype)
            real_t = self.teacher.add_noise(real, torch.randn_like(real), t_real)
            logits_real, _ = self._gan_logits(real_t, t_real, cond)
            loss_gan = losses.gan_discriminator(logits_real, logits_fake)
            loss = loss + self.gan_discriminator_weight * loss_gan
            logs["loss_gan_d"] = loss_gan.detach()
        logs["loss_critic"] = loss.detach()
        return loss, logs

    # ----------------------------------------------------------------- sampling
    def sampling_timesteps(self, steps: Optional[int] = None) -> list[int]:
        """The student's timesteps for ``steps`` steps: all it was trained on by default, else an
        evenly spread subset (always starting from the first)."""
        n = len(self.timesteps)
        if steps is None:
            return list(self.timesteps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
            raise ValueError(f"steps: expected an int in [1, {n}] (the student's trained steps), got {steps!r}")
        if steps == 1:
            return [self.timesteps[0]]
        return [self.timesteps[round(i * (n - 1) / (steps - 1))] for i in range(steps)]

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: Optional[int] = None, **cond) -> torch.Tensor:
        """The generator's few-step sample: x0 from noise at the first timestep, re-noised with fresh
        noise to each next timestep (DMD2's multi-step sampler)."""
        ts = self.sampling_timesteps(steps)
        x = noise
        for i, t in enumerate(ts):
            x0 = self.generator(x, timestep(t, x), **cond).x0
            if i + 1 == len(ts):
                return x0.to(noise.dtype)
            x = self.generator.add_noise(x0, torch.randn_like(x0), timestep(ts[i + 1], x)).to(noise.dtype)


def _native_output_and_target(prediction: str, pred, x0: torch.Tensor, eps: torch.Tensor):
    """The fake score's output in its own parametrization and the exact value for (x0, eps)."""
    if prediction == "eps":
        return pred.eps, eps
    if prediction == "x0":
        return pred.x0, x0
    if prediction == "v":
        return pred.v, pred.alpha * eps - pred.sigma * x0
    return pred.flow, eps - x0


class DMD(DMD2):
    """Plain DMD (Yin et al. 2023): one-step generator, regression loss on teacher pairs (required),
    no GAN, generator and fake score updated every step."""

    def __init__(self, teacher: Denoiser, generator: Optional[nn.Module] = None,
                 fake_score: Optional[nn.Module] = None, *, regression_weight: float = 0.25, **kwargs):
        if not isinstance(regression_weight, (int, float)) or isinstance(regression_weight, bool) \
                or not regression_weight > 0:
            raise ValueError(f"regression_weight: expected a number > 0 (DMD needs its regression loss), "
                             f"got {regression_weight!r}")
        for name in ("gan_head", "gan_feature_layer", "dfake_gen_update_ratio"):
            if name in kwargs:
                raise TypeError(f"{name}: not an argument of DMD (no GAN, ratio 1); use DMD2")
        super().__init__(teacher, generator, fake_score, regression_weight=regression_weight,
                         dfake_gen_update_ratio=1, **kwargs)
