"""BOOT: the bootstrapping target is the teacher's DDIM step (a student that is the teacher's DDIM
trajectory has zero loss, on VP and flow schedules), the loss gradient against a hand-computed
one, sampling, bad input, and a real data-free 1-step distillation of an exact mixture teacher."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import fewstep
from fewstep.demo.data import sliced_wasserstein2
from fewstep.distill.boot import BOOT
from fewstep.distill.common import ddim_sample

from toy_models import MLP, SCHEDULE, mixture





class Trajectory(nn.Module):
    """A student that returns a stored signal per (grid timestep, sample): y[pos(t), b]."""

    def __init__(self, grid: list[int], y: torch.Tensor):
        super().__init__()
        self.grid, self.y = torch.tensor(grid), y
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        pos = (self.grid[None, :] == t[:, None]).int().argmax(1)
        return self.y[pos, torch.arange(x.shape[0])] + 0 * self.dummy


def teacher_ddim_signals(teacher: fewstep.Denoiser, eps: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """The signals y_i = (x_i - sigma_i eps) / alpha_i of the teacher's DDIM run in x-space over the
    grid, from the boundary y_0 = f(eps, T) (state x_T = alpha_T y_0 + sigma_T eps)."""
    def at(i, like):
        return teacher.schedule.alpha_sigma(torch.full((like.shape[0],), grid[i]), like)

    y0 = teacher(eps, torch.full((eps.shape[0],), grid[0])).x0
    alpha, sigma = at(0, eps)
    x = alpha * y0 + sigma * eps
    ys = [y0]
    for i in range(1, len(grid)):
        pred = teacher(x, torch.full((eps.shape[0],), grid[i - 1]))
        alpha, sigma = at(i, eps)
        x = alpha * pred.x0 + sigma * pred.eps
        ys.append((x - sigma * eps) / alpha)
    return torch.stack(ys)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_teacher_ddim_trajectory_is_the_fixed_point(kind):
    if kind == "vp":
        teacher = fewstep.Denoiser(mixture(), "eps", SCHEDULE)
    else:
        torch.manual_seed(0)
        teacher = fewstep.Denoiser(MLP().double(), "flow", fewstep.FlowSchedule())
    eps = torch.randn(64, 2, dtype=torch.float64)
    m = BOOT(teacher, fewstep.Denoiser(nn.Identity(), "x0", teacher.schedule), num_intervals=6)
    ys = teacher_ddim_signals(teacher, eps, m.timesteps)
    m.student = fewstep.Denoiser(Trajectory(m.timesteps, ys), "x0", teacher.schedule)
    for weighting in ("inv_delta_sq", "uniform"):
        m.weighting = weighting
        loss, _ = m.loss("student", {"noise": eps}, 0)
        assert float(loss.detach()) < 1e-24, (weighting, float(loss.detach()))
    # off the trajectory at one timestep: the loss sees it
    bent = ys.clone()
    bent[3] += 0.01
    m.student = fewstep.Denoiser(Trajectory(m.timesteps, bent), "x0", teacher.schedule)
    assert float(m.loss("student", {"noise": eps}, 0)[0].detach()) > 1e-7


class Affine(nn.Module):
    """x0-prediction student a * eps + b, the same at every t."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.6, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.2, -0.1], dtype=torch.float64))

    def forward(self, x, t):
        return self.a * x + self.b


@pytest.mark.parametrize("weighting", ["inv_delta_sq", "uniform"])
def test_loss_gradient_matches_hand_computed(weighting):
    toy = mixture()
    teacher = fewstep.Denoiser(toy, "eps", SCHEDULE)
    m = BOOT(teacher, fewstep.Denoiser(Affine(), "x0", SCHEDULE), num_intervals=4, weighting=weighting)
    eps = torch.randn(7, 2, dtype=torch.float64)
    torch.manual_seed(4)
    loss, logs = m.loss("student", {"noise": eps}, 0)
    loss.backward()

    torch.manual_seed(4)
    j = torch.randint(0, 5, (7,))
    grid = torch.tensor(m.timesteps)
    t, s = grid[(j - 1).clamp(min=0)], grid[j]
    a, b = m.student.model.a.detach(), m.student.model.b.detach()
    y = a * eps + b  # y_t = y_s: the student ignores t
    alpha_t, sigma_t = SCHEDULE.alpha_sigma(t, y)
    alpha_s, sigma_s = SCHEDULE.alpha_sigma(s, y)
    boundary = (j == 0)[:, None]
    x_hat = torch.where(boundary, eps, alpha_t * y + sigma_t * eps)
    alpha_h, sigma_h = SCHEDULE.alpha_sigma(t, x_hat)
    f = (x_hat - sigma_h * toy(x_hat, t)) / alpha_h
    # delta = 1 - exp(lambda_t - lambda_s), lambda = log(alpha / sigma)
    lam = lambda al, si: torch.log(al / si)  # noqa: E731
    delta = torch.where(boundary, 1.0, 1 - torch.exp(lam(alpha_t, sigma_t) - lam(alpha_s, sigma_s)))
    assert bool(((delta > 0) & (delta <= 1)).all())
    target = y + delta * (f - y)
    weight = delta.square().reciprocal() if weighting == "inv_delta_sq" else torch.ones_like(delta)
    expected = (weight * (y - target).square()).mean()
    d_y = weight * 2 * (y - target) / y.numel()
    torch.testing.assert_close(logs["loss_boot"], expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(m.student.model.b.grad, d_y.sum(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(m.student.model.a.grad, (d_y * eps).sum(), rtol=1e-10, atol=1e-14)


def test_guided_target_uses_cfg():
    class Cond(nn.Module):
        def __init__(self, toy):
            super().__init__()
            self.toy = toy

        def forward(self, x, t, c=0.0):
            return self.toy(x, t) + c

    toy = mixture()
    teacher = fewstep.Denoiser(Cond(toy), "eps", SCHEDULE)
    m = BOOT(teacher, fewstep.Denoiser(Affine(), "x0", SCHEDULE), guidance_scale=3.0, null_cond={"c": 0.0})
    eps = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    t, s = torch.full((4,), 499), torch.full((4,), 400)
    no = torch.zeros(4, dtype=torch.bool)
    target, delta = m.bootstrap_target(eps, y, t, s, no, {"c": 0.1}, {"c": 0.0})
    cond_only, _ = BOOT(teacher, Affine()).bootstrap_target(eps, y, t, s, no, {"c": 0.1}, None)
    uncond_only, _ = BOOT(teacher, Affine()).bootstrap_target(eps, y, t, s, no, {"c": 0.0}, None)
    torch.testing.assert_close(target, uncond_only + 3.0 * (cond_only - uncond_only))


def test_phases_and_sampling():
    calls = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            calls.append(int(t[0]))
            return self.inner(x, t)

    teacher = fewstep.Denoiser(Spy(mixture()), "eps", SCHEDULE)
    m = BOOT(teacher, fewstep.Denoiser(Affine(), "x0", SCHEDULE), num_intervals=8)
    assert m.phases == ("student",) and tuple(m.phases_at(5)) == ("student",)
    assert m.timesteps[0] == 999 and m.timesteps[-1] == 0 and len(m.timesteps) == 9
    assert [id(p) for p in m.parameters_of("student")] == [id(m.student.model.a), id(m.student.model.b)]
    eps = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(m.sample(eps), m.student.model.a.detach() * eps + m.student.model.b.detach())
    assert calls == []  # one step: the student alone
    out = m.sample(eps, steps=4)  # student jumps to t=749, teacher DDIM 749 -> 499 -> 249
    assert calls == [749, 499, 249] and out.shape == (3, 2)
    y = m.student.model.a.detach() * eps + m.student.model.b.detach()
    alpha, sigma = SCHEDULE.alpha_sigma(torch.full((3,), 749), y)
    torch.testing.assert_close(out, ddim_sample(teacher, alpha * y + sigma * eps, [749, 499, 249], {}))


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_runs_on_other_parametrizations(prediction):
    schedule = fewstep.FlowSchedule() if prediction == "flow" else SCHEDULE
    torch.manual_seed(0)
    m = BOOT(fewstep.Denoiser(MLP().double(), prediction, schedule))  # student: a copy of the teacher
    loss, _ = m.loss("student", {"noise": torch.randn(8, 2, dtype=torch.float64)}, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters_of("student"))
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_student_prediction_of_the_teacher_copy():
    teacher = fewstep.Denoiser(MLP().double(), "eps", SCHEDULE)
    m = BOOT(teacher, student_prediction="x0")
    assert m.student.prediction == "x0" and m.student.model is not teacher.model
    eps, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 500)
    torch.testing.assert_close(m.signal(eps, t), teacher.model(eps, t))
    with pytest.raises(ValueError, match="student_prediction"):
        BOOT(teacher, fewstep.Denoiser(Affine(), "x0", SCHEDULE), student_prediction="v")


def test_bad_input_is_named():
    teacher = fewstep.Denoiser(mixture(), "eps", SCHEDULE)
    with pytest.raises(TypeError, match="teacher"):
        BOOT(mixture(), Affine())
    with pytest.raises(ValueError, match="weighting"):
        BOOT(teacher, Affine(), weighting="snr")
    with pytest.raises(ValueError, match="num_intervals"):
        BOOT(teacher, Affine(), num_intervals=0)
    with pytest.raises(ValueError, match="timesteps"):
        BOOT(teacher, Affine(), timesteps=[999])
    with pytest.raises(ValueError, match="guidance_scale"):
        BOOT(teacher, Affine(), guidance_scale=float("nan"))
    m = BOOT(teacher, Affine(), guidance_scale=2.0)
    with pytest.raises(ValueError, match="uncond"):
        m.loss("student", {"noise": torch.randn(2, 2)}, 0)
    with pytest.raises(ValueError, match="'noise' or 'x0'"):
        BOOT(teacher, Affine()).loss("student", {}, 0)
    with pytest.raises(ValueError, match="phase"):
        m.loss("critic", {"noise": torch.randn(2, 2)}, 0)
    with pytest.raises(ValueError, match="steps"):
        m.sample(torch.randn(2, 2), steps=0)



def test_one_step_student_beats_one_step_teacher(one_thread):
    """Data-free: 500 steps from noise alone make the 1-step student far closer to the data (sliced
    W2) than the teacher's 1-step DDIM, and close to the teacher's DDIM on the student's grid."""
    torch.manual_seed(0)
    toy = mixture()
    teacher = fewstep.Denoiser(toy, "eps", SCHEDULE)
    m = BOOT(teacher, fewstep.Denoiser(MLP(), "x0", SCHEDULE), num_intervals=16)
    opt = torch.optim.Adam(m.parameters_of("student"), lr=1e-3)
    for step in range(500):
        loss, _ = m.loss("student", {"noise": torch.randn(256, 2)}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = toy.sample_data(2000, torch.Generator().manual_seed(5)).float()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    teacher_1 = sliced_wasserstein2(ddim_sample(teacher, z, [999], {}), data)
    teacher_grid = ddim_sample(teacher, z, m.timesteps, {})
    student = m.sample(z)
    assert sliced_wasserstein2(student, data) < 0.4 * teacher_1, (sliced_wasserstein2(student, data), teacher_1)
    assert (student - teacher_grid).norm(dim=1).mean() < 0.4, float((student - teacher_grid).norm(dim=1).mean())
