"""Guided distillation: stage 1 (w-conditioned student vs the CFG-combined teacher) and stage 2
(progressive distillation) losses and gradients against hand-computed values, the progressive
target landing the student's DDIM step on the teacher's two, next_round, sampling, bad input, and
a real progressive round on an exact Gaussian-mixture teacher beating its own 4-step DDIM."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fewstep
from fewstep.distill._guidance import guidance_embedding
from fewstep.distill.common import ddim_sample, spaced_timesteps
from fewstep.distill.guided import GuidedDistillation
from fewstep.toy import GaussianMixtureDenoiser

from toy_models import ABAR, SCHEDULE, Affine, CondTeacher, affine_teacher as teacher





def method_with(student: nn.Module, **kwargs) -> GuidedDistillation:
    kwargs = {"w_min": 0.5, "w_max": 3.0, "w_embedding": 8, "null_cond": {"c": -0.2}, **kwargs}
    return GuidedDistillation(teacher(), fewstep.Denoiser(student, "x0", SCHEDULE), **kwargs)


def tiny_batch(dim: int = 3):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(3, dim, generator=gen, dtype=torch.float64),
            torch.randn(3, dim, generator=gen, dtype=torch.float64))


def col(v):
    return torch.as_tensor(v, dtype=torch.float64).view(-1, 1)


def alpha_sigma(t):
    """(alpha, sigma) per sample; timestep -1 is the clean end (1, 0)."""
    t = torch.as_tensor(t)
    abar = torch.where(t < 0, torch.ones((), dtype=torch.float64), ABAR[t.clamp_min(0)])
    return col(abar.sqrt()), col((1 - abar).sqrt())


def truncated_snr(t):
    return col((ABAR[t] / (1 - ABAR[t])).clamp_min(1.0))


def test_guidance_loss_matches_hand_computation():
    student = Affine(3)
    method = method_with(student)
    x0, noise = tiny_batch()
    t = torch.tensor([0, 500, 999])
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    got, logs = method.guidance_loss(x0, {"c": 0.3}, noise=noise, t=t, w=w)
    got.backward()

    alpha, sigma = alpha_sigma(t)
    z = alpha * x0 + sigma * noise
    x0_c, x0_u = (z - sigma * (0.5 * z + 0.3)) / alpha, (z - sigma * (0.5 * z - 0.2)) / alpha
    target = (1 + col(w)) * x0_c - col(w) * x0_u
    s, b = student.s.detach().clone().requires_grad_(), student.b.detach().clone().requires_grad_()
    want = (truncated_snr(t) * ((s * z + b - target) ** 2).mean(1, keepdim=True)).mean()
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(logs["loss"].double(), want.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(student.b.grad, b.grad, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(student.s.grad, s.grad, rtol=1e-9, atol=1e-15)
    assert student.calls[-1]["c"] == 0.3 and student.calls[-1]["timestep_cond"].shape == (3, 8)


def test_progressive_loss_matches_hand_computation():
    student = Affine(3)
    method = method_with(student, num_steps=4)  # teacher grid 999, 749, 499, 249, clean
    method.next_round()
    assert (method.stage, method.num_steps) == (2, 2)
    teacher_params = (student.s.detach().clone(), student.b.detach().clone())
    with torch.no_grad():  # the student moves on; the frozen teacher keeps the weights it had
        student.s.add_(0.1)
        student.b.mul_(-2.0)
    x0, noise = tiny_batch()
    step_index = torch.tensor([0, 1, 1])
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    got, _ = method.progressive_loss(x0, {"c": 0.3}, noise=noise, step_index=step_index, w=w)
    got.backward()

    t, t_mid, t_end = torch.tensor([999, 499, 499]), torch.tensor([749, 249, 249]), torch.tensor([499, -1, -1])
    (a_t, s_t), (a_m, s_m), (a_e, s_e) = alpha_sigma(t), alpha_sigma(t_mid), alpha_sigma(t_end)
    z = a_t * x0 + s_t * noise

    def ddim(z_from, a_from, s_from, a_to, s_to):
        x_hat = teacher_params[0] * z_from + teacher_params[1]
        return a_to * x_hat + s_to * (z_from - a_from * x_hat) / s_from

    z_end = ddim(ddim(z, a_t, s_t, a_m, s_m), a_m, s_m, a_e, s_e)
    target = (z_end - (s_e / s_t) * z) / (a_e - (s_e / s_t) * a_t)
    # the target is the x-prediction whose one DDIM step t -> t_end lands on the teacher's two
    torch.testing.assert_close(a_e * target + s_e * (z - a_t * target) / s_t, z_end, rtol=1e-12, atol=1e-12)
    s, b = student.s.detach().clone().requires_grad_(), student.b.detach().clone().requires_grad_()
    want = (truncated_snr(t) * ((s * z + b - target) ** 2).mean(1, keepdim=True)).mean()
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(student.b.grad, b.grad, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(student.s.grad, s.grad, rtol=1e-9, atol=1e-15)
    assert all(p.grad is None for p in method.progressive_teacher.parameters())


def test_next_round_freezes_a_copy_and_halves():
    student = Affine(3)
    method = method_with(student, num_steps=8)
    x0, noise = tiny_batch()
    with pytest.raises(RuntimeError, match="call next_round"):
        method.progressive_loss(x0, {"c": 0.3})
    teacher_calls = []
    method.teacher.model.register_forward_hook(lambda mod, args, out: teacher_calls.append(1))
    method.loss("student", {"x0": x0, "cond": {"c": 0.3}}, 0)  # stage 1: the CFG teacher, cond and uncond
    assert len(teacher_calls) == 2

    method.next_round()
    frozen = method.progressive_teacher.model
    assert frozen is not student and all(not p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(p, q) for p, q in zip(frozen.parameters(), student.parameters()))
    with torch.no_grad():
        student.b.add_(1.0)
    assert not torch.equal(frozen.b, student.b)
    frozen.calls.clear()
    method.loss("student", {"x0": x0, "cond": {"c": 0.3}}, 1)  # stage 2: two steps of the frozen copy
    assert len(frozen.calls) == 2 and len(teacher_calls) == 2
    method.next_round()
    method.next_round()
    assert method.num_steps == 1
    assert [int(t) for t in method.teacher_grid] == [999, 499, -1]  # the 2-step teacher of the 1-step student
    with pytest.raises(ValueError, match="num_steps: expected an even count to halve, got 1"):
        method.next_round()


def test_sample_is_ddim_of_the_student():
    student = Affine(3)
    method = method_with(student, num_steps=2)
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = student.s * noise + student.b  # one step: the x-prediction at 999
        (a, s), (a2, s2) = alpha_sigma([999]), alpha_sigma([499])
        z = a2 * one + s2 * (noise - a * one) / s
        two = student.s * z + student.b
    torch.testing.assert_close(method.sample(noise, 1), one, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(method.sample(noise), two, rtol=1e-12, atol=1e-12)
    emb = student.calls[-1]["timestep_cond"]
    torch.testing.assert_close(emb, guidance_embedding(torch.full((4,), 1.75), 8))


def test_bad_input():
    with pytest.raises(ValueError, match="w_embedding: expected the size of the student's w-embedding"):
        GuidedDistillation(teacher(), Affine(3), w_min=0.0, w_max=2.0)
    with pytest.raises(ValueError, match="teacher: expected a Denoiser on a VPSchedule"):
        GuidedDistillation(fewstep.Denoiser(CondTeacher(), "flow"), Affine(3), w_min=1.0, w_max=1.0)
    shared = CondTeacher()
    with pytest.raises(ValueError, match="student: expected a module of its own"):
        GuidedDistillation(fewstep.Denoiser(shared, "eps", SCHEDULE), shared, w_min=1.0, w_max=1.0)
    with pytest.raises(ValueError, match=r"num_steps: expected an int in \[1, 1000\]"):
        method_with(Affine(3), num_steps=0)
    x0, _ = tiny_batch()
    with pytest.raises(ValueError, match="uncond"):
        method_with(Affine(3), null_cond=None).loss("student", {"x0": x0}, 0)
    with pytest.raises(ValueError, match=r"batch\['x0'\]: expected a floating tensor"):
        method_with(Affine(3)).loss("student", {"x0": torch.ones(3, 3, dtype=torch.int64)}, 0)


class MLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t):
        freqs = torch.exp(torch.arange(16, device=x.device) * (-math.log(1000.0) / 15))
        angles = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) * freqs
        return self.net(torch.cat([x, angles.sin(), angles.cos()], 1))


class Residual(nn.Module):
    """The exact teacher plus a trainable correction that starts at zero: a student initialized
    from the teacher, as the paper's."""

    def __init__(self, toy):
        super().__init__()
        self.toy, self.correction = toy, MLP()
        nn.init.zeros_(self.correction.net[-1].weight)
        nn.init.zeros_(self.correction.net[-1].bias)

    def forward(self, x, t):
        return self.toy(x, t) + self.correction(x, t)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256) -> float:
    dirs = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def test_progressive_round_beats_teacher_ddim(one_thread):
    """A student initialized from the exact mixture teacher, distilled from its 8-step DDIM into 4
    steps, samples the 8-mode ring clearly better in 4 steps than the teacher does."""
    torch.manual_seed(0)
    abar = fewstep.samplers.schedules.alphas_cumprod(beta_start=0.00085, beta_end=0.012,
                                                     beta_schedule="scaled_linear")
    toy = GaussianMixtureDenoiser(abar, shape=(2,), num_modes=8, std=0.1)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    toy.means.copy_(torch.stack([angles.cos(), angles.sin()], 1))
    schedule = fewstep.VPSchedule(abar)
    method = GuidedDistillation(fewstep.Denoiser(toy, "eps", schedule),
                                fewstep.Denoiser(Residual(toy), "eps", schedule), w_min=0.0, w_max=0.0, num_steps=8)
    method.next_round()
    opt = torch.optim.Adam(method.parameters_of("student"), lr=1e-3)
    for step in range(300):
        loss, _ = method.loss("student", {"x0": toy.sample_data(256).float()}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()

    gen = torch.Generator().manual_seed(1)
    data = toy.sample_data(2000, gen).float()
    noise = torch.randn(2000, 2, generator=gen)
    teacher_4 = sliced_w2(ddim_sample(method.teacher, noise, spaced_timesteps(1000, 4), {}), data)
    teacher_8 = sliced_w2(ddim_sample(method.teacher, noise, spaced_timesteps(1000, 8), {}), data)
    student_4 = sliced_w2(method.sample(noise), data)
    assert student_4 < 0.8 * teacher_4, \
        f"4 steps: student {student_4:.3f}, teacher {teacher_4:.3f} (teacher at 8: {teacher_8:.3f})"



def test_stages_run_in_the_trainer_under_ddp(tmp_path):
    """Stage 1, then next_round on the trainer's DDP-wrapped student, then stage 2, in one process group."""
    import torch.distributed as dist

    from fewstep.train import Trainer
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        abar = fewstep.samplers.schedules.alphas_cumprod()
        toy = GaussianMixtureDenoiser(abar, shape=(2,), num_modes=4, std=0.2)
        method = GuidedDistillation(fewstep.Denoiser(toy, "eps", SCHEDULE), fewstep.Denoiser(MLP(), "eps", SCHEDULE),
                                    w_min=0.0, w_max=0.0, num_steps=4)
        trainer = Trainer(method, lambda index, gen: {"x0": toy.sample_data(8, generator=gen).float()}, max_steps=2,
                          mixed_precision="no", progress=False, parallel="ddp", lr=1e-3)
        trainer.train()
        wrapped = method.student.model
        assert type(wrapped).__name__ == "_DDP"
        method.next_round()
        assert type(method.progressive_teacher.model) is MLP
        assert all(torch.equal(p, q) for p, q in zip(method.progressive_teacher.parameters(), wrapped.parameters()))
        trainer.max_steps = 4
        trainer.train()
        assert trainer.step == 4 and method.num_steps == 2
        assert not all(torch.equal(p, q) for p, q in zip(method.progressive_teacher.parameters(), wrapped.parameters()))
    finally:
        dist.destroy_process_group()
