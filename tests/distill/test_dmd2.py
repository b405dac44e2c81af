"""DMD2 / DMD: loss gradients against hand-computed ones, the two time-scale schedule, backward
simulation's timesteps, GAN and regression terms, bad input, and a real 1-step distillation of an
exact Gaussian-mixture teacher."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import fewstep
from fewstep.demo.data import sliced_wasserstein2
from fewstep.distill.dmd2 import DMD, DMD2
from fewstep.distill.common import ddim_sample, spaced_timesteps

from toy_models import MLP, SCHEDULE, mixture




class CondTeacher(nn.Module):
    """The mixture's exact eps plus a condition offset: cond and uncond predictions differ."""

    def __init__(self, toy):
        super().__init__()
        self.toy = toy

    def forward(self, x, t, c=0.0):
        return self.toy(x, t) + (c[:, None] if isinstance(c, torch.Tensor) else c)


class Shift(nn.Module):
    """x0-prediction model ``x_t + b``: its gradient w.r.t. b is the sum of dloss/d(output)."""

    def __init__(self, dim: int):
        super().__init__()
        self.b = nn.Parameter(torch.linspace(-0.3, 0.4, dim, dtype=torch.float64))

    def forward(self, x, t, **cond):
        return x + self.b


class Scale(nn.Module):
    """Model ``w * x_t`` (one scalar parameter)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x, t, **cond):
        return self.w * x




def x0_model(model) -> fewstep.Denoiser:
    return fewstep.Denoiser(model, "x0", SCHEDULE)


def teacher_of(toy, cond=False):
    return fewstep.Denoiser(CondTeacher(toy) if cond else toy, "eps", SCHEDULE)


# ----------------------------------------------------------------------------- schedule
def test_two_time_scale_phases():
    m = DMD2(teacher_of(mixture()), Shift(2), Shift(2), dfake_gen_update_ratio=3)
    assert [tuple(m.phases_at(s)) for s in range(7)] == [
        ("generator", "critic"), ("critic",), ("critic",), ("generator", "critic"), ("critic",), ("critic",),
        ("generator", "critic")]
    plain = DMD(teacher_of(mixture()), Shift(2), Shift(2), regression_pairs=(torch.randn(4, 2), torch.randn(4, 2)))
    assert all(tuple(plain.phases_at(s)) == ("generator", "critic") for s in range(4))
    assert plain.gan_head is None and plain.regression_weight == 0.25


def test_parameters_of_phases_are_disjoint():
    head = nn.Linear(2, 1)
    m = DMD2(teacher_of(mixture()), Shift(2), Shift(2), gan_head=head)
    gen, critic = m.parameters_of("generator"), m.parameters_of("critic")
    assert [id(p) for p in gen] == [id(m.generator.model.b)]
    assert {id(p) for p in critic} == {id(m.fake_score.model.b), id(head.weight), id(head.bias)}
    with pytest.raises(ValueError, match="phase"):
        m.parameters_of("student")


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_generator_gradient_matches_hand_computed(guidance):
    toy = mixture(dim=3)
    teacher = teacher_of(toy, cond=True)
    m = DMD2(teacher, x0_model(Shift(3)), x0_model(Scale()), guidance_scale=guidance, null_cond={"c": 0.0})
    noise = torch.randn(5, 3, dtype=torch.float64)
    cond = {"c": 0.2}
    torch.manual_seed(11)
    loss, logs = m.generator_loss({"noise": noise, "cond": cond})
    loss.backward()

    torch.manual_seed(11)  # the same draws: DMD's timestep, then its noise
    b = m.generator.model.b.detach()
    x = noise + b  # one step: the generator's x0 at the input noise
    t = torch.randint(m.t_min, m.t_max + 1, (5,))
    eps = torch.randn_like(x)
    alpha, sigma = SCHEDULE.alpha_sigma(t, x)
    x_t = alpha * x + sigma * eps
    x0_of = lambda e: (x_t - sigma * e) / alpha  # noqa: E731
    real_c, real_u = x0_of(toy(x_t, t) + 0.2), x0_of(toy(x_t, t))
    real = real_u + guidance * (real_c - real_u)
    fake = 0.7 * x_t
    grad_x = (fake - real) / (x - real).abs().mean(1, keepdim=True) / x.numel()
    torch.testing.assert_close(m.generator.model.b.grad, grad_x.sum(0), rtol=1e-9, atol=1e-12)
    assert m.fake_score.model.w.grad is None  # no gradient leaks into the critic
    torch.testing.assert_close(logs["loss_dmd"], 0.5 * (grad_x * x.numel()).square().mean())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_critic_gradient_matches_hand_computed(prediction):
    schedule = fewstep.FlowSchedule() if prediction == "flow" else SCHEDULE
    teacher = fewstep.Denoiser(Scale(), prediction, schedule)
    m = DMD2(teacher, fewstep.Denoiser(Shift(3), "x0", schedule), fewstep.Denoiser(Scale(), prediction, schedule),
             critic_t_min=10, critic_t_max=990)
    noise = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(3)
    loss, _ = m.critic_loss({"noise": noise})
    loss.backward()

    torch.manual_seed(3)
    x = noise + m.generator.model.b.detach()
    t = torch.randint(10, 991, (4,))
    eps = torch.randn_like(x)
    alpha, sigma = schedule.alpha_sigma(t, x)
    x_t = alpha * x + sigma * eps
    target = {"eps": eps, "x0": x, "v": alpha * eps - sigma * x, "flow": eps - x}[prediction]
    w = m.fake_score.model.w.detach()
    expected_loss = (w * x_t - target).square().mean()  # the raw output w x_t is the prediction
    expected_grad = (2 * (w * x_t - target) * x_t).mean()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.fake_score.model.w.grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert m.generator.model.b.grad is None


def test_regression_loss_gradient():
    toy = mixture(dim=2)
    pairs = (torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    m = DMD(teacher_of(toy), x0_model(Shift(2)), Scale(), regression_weight=0.5, regression_pairs=pairs)
    batch = {"noise": torch.randn(3, 2, dtype=torch.float64),
             "regression_noise": pairs[0][:3], "regression_x0": pairs[1][:3]}
    _, logs = m.generator_loss(batch)
    b = m.generator.model.b.detach()
    expected = (pairs[0][:3] + b - pairs[1][:3]).square().mean()
    torch.testing.assert_close(logs["loss_regression"], expected)
    # the regression term's gradient alone: total minus the DMD term's
    m.generator.model.b.grad = None
    torch.manual_seed(0)
    loss, _ = m.generator_loss(batch)
    loss.backward()
    with_reg = m.generator.model.b.grad.clone()
    m.regression_weight = 0.0
    m.generator.model.b.grad = None
    torch.manual_seed(0)
    m.generator_loss(batch)[0].backward()
    reg_grad = 0.5 * 2 * (pairs[0][:3] + b - pairs[1][:3]).sum(0) / 6
    torch.testing.assert_close(with_reg - m.generator.model.b.grad, reg_grad)
    # pairs drawn from the stored set when the batch has none
    _, logs = DMD(teacher_of(toy), Shift(2), Scale(), regression_pairs=pairs).generator_loss({"noise": batch["noise"]})
    assert torch.isfinite(logs["loss_regression"])


def test_conditional_regression_pairs_keep_their_condition():
    teacher = teacher_of(mixture(), cond=True)

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, x, t, c=0.0):
            return x + self.b + (c[:, None] if isinstance(c, torch.Tensor) else c)

    m = DMD(teacher, x0_model(Cond()), x0_model(Scale()))
    noise = torch.randn(6, 2, dtype=torch.float64)
    c = torch.arange(6, dtype=torch.float64)
    pairs = m.teacher_pairs(noise, steps=4, c=c)
    assert pairs[2]["c"] is c
    # the teacher's 4-step DDIM with each pair's own condition
    expected = torch.stack([ddim_sample(teacher, noise[i:i + 1], spaced_timesteps(1000, 4), {"c": c[i:i + 1]})[0]
                            for i in range(6)])
    torch.testing.assert_close(pairs[1], expected)
    m = DMD(teacher, x0_model(Cond()), x0_model(Scale()), regression_pairs=pairs)
    batch = {"noise": torch.randn(4, 2, dtype=torch.float64), "cond": {"c": torch.zeros(4)}}
    torch.manual_seed(2)
    _, logs = m.generator_loss(batch)
    torch.manual_seed(2)
    torch.randint(m.t_min, m.t_max + 1, (4,))  # DMD's timestep and noise come first
    torch.randn(4, 2, dtype=torch.float64)
    idx = torch.randint(6, (4,))
    expected = (noise[idx] + c[idx, None] - pairs[1][idx]).square().mean()  # the generator at each pair's c
    torch.testing.assert_close(logs["loss_regression"], expected)
    with pytest.raises(ValueError, match="rows"):
        DMD(teacher, x0_model(Cond()), Scale(), regression_pairs=(noise, pairs[1], {"c": c[:3]}))


class Features(nn.Module):
    """A fake score with a named hidden layer for the GAN head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 4).double()
        self.out = nn.Linear(4, 2).double()

    def forward(self, x, t):
        return self.out(torch.tanh(self.body(x)))


def test_gan_terms_and_gradient_isolation():
    toy = mixture()
    head = nn.Linear(4, 1).double()
    m = DMD2(teacher_of(toy), x0_model(Shift(2)), x0_model(Features()), gan_head=head,
             gan_feature_layer="body", gan_generator_weight=0.1, gan_discriminator_weight=0.2)
    batch = {"noise": torch.randn(6, 2, dtype=torch.float64), "x0": toy.sample_data(6)}
    loss, logs = m.generator_loss(batch)
    loss.backward()
    assert set(logs) == {"loss_dmd", "loss_gan_g", "loss_generator"}
    assert m.generator.model.b.grad is not None
    assert all(p.grad is None for p in m.parameters_of("critic"))
    assert all(p.requires_grad for p in m.parameters_of("critic"))  # unfrozen after the loss
    torch.testing.assert_close(logs["loss_generator"], logs["loss_dmd"] + 0.1 * logs["loss_gan_g"])

    m.generator.model.b.grad = None
    loss, logs = m.critic_loss(batch)
    loss.backward()
    assert m.generator.model.b.grad is None
    assert head.weight.grad is not None and m.fake_score.model.body.weight.grad is not None
    torch.testing.assert_close(logs["loss_critic"], logs["loss_denoising"] + 0.2 * logs["loss_gan_d"])


def test_gan_discriminator_value_on_hand_computed_logits():
    toy = mixture()
    head = nn.Linear(4, 1).double()
    m = DMD2(teacher_of(toy), x0_model(Shift(2)), x0_model(Features()), gan_head=head,
             gan_feature_layer="body")
    noise, real = torch.randn(5, 2, dtype=torch.float64), toy.sample_data(5)
    torch.manual_seed(9)
    _, logs = m.critic_loss({"noise": noise, "x0": real})
    torch.manual_seed(9)
    x = noise + m.generator.model.b.detach()
    t = torch.randint(0, 1000, (5,))
    alpha, sigma = SCHEDULE.alpha_sigma(t, x)
    fake_t = alpha * x + sigma * torch.randn_like(x)
    t_real = torch.randint(0, 1000, (5,))
    alpha_r, sigma_r = SCHEDULE.alpha_sigma(t_real, real)
    real_t = alpha_r * real + sigma_r * torch.randn_like(real)
    feats = m.fake_score.model.body
    with torch.no_grad():
        expected = (nn.functional.softplus(-head(feats(real_t))).mean()
                    + nn.functional.softplus(head(feats(fake_t))).mean())
    torch.testing.assert_close(logs["loss_gan_d"], expected)


# ----------------------------------------------------------------------------- backward simulation
class Recorder(nn.Module):
    """x0-prediction model that records the timesteps (and whether grad was on) it is called at."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x, t):
        self.calls.append((int(t[0]), torch.is_grad_enabled()))
        return 0.5 * x + self.b


def test_backward_simulation_timesteps():
    rec = Recorder()
    m = DMD2(teacher_of(mixture()), fewstep.Denoiser(rec, "x0", SCHEDULE), Shift(2), num_steps=4)
    assert m.timesteps == [999, 749, 499, 249]
    seen = set()
    noise = torch.randn(3, 2, dtype=torch.float64)
    for seed in range(40):
        torch.manual_seed(seed)
        k = int(torch.randint(4, ()))
        torch.manual_seed(seed)
        rec.calls.clear()
        m.generator_loss({"noise": noise})
        # k rolled steps without gradient, then the trained step at the k-th timestep
        assert rec.calls == [(t, False) for t in m.timesteps[:k]] + [(m.timesteps[k], True)], (seed, k)
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_backward_simulation_renoises_each_x0():
    rec = Recorder()
    m = DMD2(teacher_of(mixture()), fewstep.Denoiser(rec, "x0", SCHEDULE), Shift(2), timesteps=[999, 499])
    inputs = []
    rec.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
    noise = torch.randn(3, 2, dtype=torch.float64)
    seed = next(s for s in range(100) if int(torch.randint(2, (), generator=torch.Generator().manual_seed(s))) == 1)
    torch.manual_seed(seed)
    torch.randint(2, ())  # the simulation depth: 1
    fresh = torch.randn(3, 2, dtype=torch.float64)
    torch.manual_seed(seed)
    m.generator_loss({"noise": noise})
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor([499] * 3), noise)
    torch.testing.assert_close(inputs[0], noise)
    torch.testing.assert_close(inputs[1], alpha * (0.5 * noise) + sigma * fresh)


def test_sample_multi_step_and_subsets():
    rec = Recorder()
    m = DMD2(teacher_of(mixture()), fewstep.Denoiser(rec, "x0", SCHEDULE), Shift(2), num_steps=4)
    assert m.sampling_timesteps() == [999, 749, 499, 249]
    assert m.sampling_timesteps(1) == [999]
    assert m.sampling_timesteps(2) == [999, 249]
    rec.calls.clear()
    out = m.sample(torch.randn(3, 2, dtype=torch.float64))
    assert [t for t, _ in rec.calls] == [999, 749, 499, 249] and out.shape == (3, 2)
    with pytest.raises(ValueError, match="steps"):
        m.sample(torch.randn(3, 2), steps=5)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_any_parametrization_and_schedule(prediction):
    schedule = fewstep.FlowSchedule() if prediction == "flow" else SCHEDULE
    teacher = fewstep.Denoiser(MLP().double(), prediction, schedule)
    m = DMD2(teacher, num_steps=2)  # generator and fake score: trainable copies of the teacher
    assert m.generator.prediction == prediction and m.parameters_of("generator")
    assert not any(p.requires_grad for p in m.teacher.parameters())
    batch = {"noise": torch.randn(4, 2, dtype=torch.float64)}
    for phase in m.phases:
        loss, logs = m.loss(phase, batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
        assert all(p.grad is not None for p in m.parameters_of(phase))
    assert m.sample(batch["noise"]).shape == (4, 2)


def test_generator_prediction_of_the_teacher_copy():
    teacher = fewstep.Denoiser(MLP().double(), "eps", SCHEDULE)
    m = DMD2(teacher, generator_prediction="x0")
    assert m.generator.prediction == "x0" and m.fake_score.prediction == "eps"
    assert m.generator.schedule is teacher.schedule and m.generator.model is not teacher.model
    torch.testing.assert_close(m.generator.model.net[0].weight, teacher.model.net[0].weight)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.full((3,), 999)
    torch.testing.assert_close(m.generator(x, t).x0, teacher.model(x, t))  # the network's output, read as x0
    assert DMD2(teacher, MLP().double(), generator_prediction="v").generator.prediction == "v"
    with pytest.raises(ValueError, match="generator_prediction"):
        DMD2(teacher, x0_model(MLP().double()), generator_prediction="x0")


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    teacher = teacher_of(mixture(), cond=True)
    with pytest.raises(TypeError, match="teacher"):
        DMD2(nn.Linear(2, 2), Shift(2), Shift(2))
    with pytest.raises(TypeError, match="generator"):
        DMD2(teacher, "model", Shift(2))
    with pytest.raises(ValueError, match="dfake_gen_update_ratio"):
        DMD2(teacher, Shift(2), Shift(2), dfake_gen_update_ratio=0)
    with pytest.raises(ValueError, match="timesteps"):
        DMD2(teacher, Shift(2), Shift(2), timesteps=[249, 999])
    with pytest.raises(ValueError, match="t_min, t_max"):
        DMD2(teacher, Shift(2), Shift(2), t_min=900, t_max=100)
    with pytest.raises(ValueError, match="gan_feature_layer"):
        DMD2(teacher, Shift(2), Shift(2), gan_feature_layer="body")
    with pytest.raises(ValueError, match="regression_weight"):
        DMD(teacher, Shift(2), Shift(2), regression_weight=0.0)
    with pytest.raises(TypeError, match="gan_head"):
        DMD(teacher, Shift(2), Shift(2), gan_head=nn.Linear(2, 1))
    m = DMD2(teacher, Shift(2), Shift(2), guidance_scale=3.0)
    with pytest.raises(ValueError, match="uncond"):
        m.generator_loss({"noise": torch.randn(2, 2, dtype=torch.float64), "cond": {"c": 0.1}})
    with pytest.raises(ValueError, match="'noise' or 'x0'"):
        m.critic_loss({})
    with pytest.raises(TypeError, match=r"batch\['cond'\]"):
        m.critic_loss({"noise": torch.randn(2, 2, dtype=torch.float64), "cond": [0.1]})
    with pytest.raises(TypeError, match=r"batch\['uncond'\]"):
        m.generator_loss({"noise": torch.randn(2, 2, dtype=torch.float64), "uncond": 0.0})
    with pytest.raises(ValueError, match="regression"):
        DMD(teacher, Shift(2), Shift(2)).generator_loss({"noise": torch.randn(2, 2, dtype=torch.float64)})
    gan = DMD2(teacher, Shift(2), Shift(2), gan_head=nn.Linear(2, 1).double())
    with pytest.raises(ValueError, match=r"batch\['x0'\]"):
        gan.critic_loss({"noise": torch.randn(2, 2, dtype=torch.float64)})


# ----------------------------------------------------------------------------- real distillation
def test_one_step_student_beats_one_step_teacher(one_thread):
    """400 steps on an exact 4-mode teacher: the 1-step generator's samples are far closer to the
    data (sliced W2) than the teacher's own 1-step DDIM sample (which is the posterior mean at pure
    noise: all samples near the modes' centroid)."""
    torch.manual_seed(0)
    toy = mixture()
    teacher = teacher_of(toy)
    m = DMD2(teacher, fewstep.Denoiser(MLP(), "x0", SCHEDULE), fewstep.Denoiser(MLP(), "x0", SCHEDULE),
             dfake_gen_update_ratio=1)
    opts = {p: torch.optim.Adam(m.parameters_of(p), lr=1e-3, betas=(0.0, 0.99)) for p in m.phases}
    for step in range(400):
        for phase in m.phases_at(step):
            loss, _ = m.loss(phase, {"noise": torch.randn(256, 2)}, step)
            opts[phase].zero_grad()
            loss.backward()
            opts[phase].step()
    data = toy.sample_data(2000, torch.Generator().manual_seed(5)).float()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    teacher_1 = sliced_wasserstein2(ddim_sample(teacher, z, [999], {}), data)
    teacher_50 = sliced_wasserstein2(ddim_sample(teacher, z, spaced_timesteps(1000, 50), {}), data)
    student = sliced_wasserstein2(m.sample(z), data)
    assert student < 0.4 * teacher_1, (student, teacher_1, teacher_50)
