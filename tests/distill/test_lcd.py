"""LCD / LCM-LoRA: the loss and its gradient against hand-computed values (CFG teacher step,
boundary scalings, EMA or self target, Huber and L2), the w-embedding, the EMA update, LoRA mode
training only the adapters with the teacher run as the base network, LCM sampling, bad input, and
a real distillation of an exact Gaussian-mixture teacher beating the teacher's own 4-step DDIM."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fewstep
from fewstep.distill.lcd import LCD
from fewstep.distill.lora import add_lora, lora_disabled
from fewstep.distill._guidance import guidance_embedding
from fewstep.toy import GaussianMixtureDenoiser

from toy_models import ABAR, SCHEDULE, Affine, CondTeacher, affine_teacher as teacher
ABAR_SD = fewstep.samplers.schedules.alphas_cumprod(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")





def tiny_batch(dim: int = 3):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    return x0, noise


def boundary(t: torch.Tensor):
    st = 10.0 * t.double()
    return 0.25 / (st ** 2 + 0.25), st / (st ** 2 + 0.25).sqrt()


def hand_lcd_loss(x0, noise, t, t_prev, w, student_params, target_params, prediction, loss):
    """LCD's loss written out: DDIM solver step of the guided teacher, then the consistency
    functions of student and target (models s x + b) compared by pseudo-Huber or L2."""
    col = lambda v: v.double().view(-1, 1)  # noqa: E731
    a_t, a_p = col(ABAR[t]), col(ABAR[t_prev])
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    eps_c, eps_u = 0.5 * x_t + 0.3, 0.5 * x_t - 0.2
    x0_c, x0_u = (x_t - (1 - a_t).sqrt() * eps_c) / a_t.sqrt(), (x_t - (1 - a_t).sqrt() * eps_u) / a_t.sqrt()
    x0_w, eps_w = x0_c + col(w) * (x0_c - x0_u), eps_c + col(w) * (eps_c - eps_u)
    x_prev = a_p.sqrt() * x0_w + (1 - a_p).sqrt() * eps_w

    def consistency(params, x, a, tt):
        out = params[0] * x + params[1]
        x0_hat = out if prediction == "x0" else (x - (1 - a).sqrt() * out) / a.sqrt()
        c_skip, c_out = boundary(tt)
        return col(c_skip) * x + col(c_out) * x0_hat

    d = consistency(student_params, x_t, a_t, t) - consistency(target_params, x_prev, a_p, t_prev).detach()
    if loss == "huber":
        return (torch.sqrt(d ** 2 + 0.001 ** 2) - 0.001).mean()
    return (d ** 2).mean()


@pytest.mark.parametrize("prediction", ["eps", "x0"])
@pytest.mark.parametrize("loss", ["huber", "l2"])
@pytest.mark.parametrize("target", ["ema", "self"])
def test_loss_and_gradient_match_hand_computation(prediction, loss, target):
    student = Affine(3)
    method = LCD(teacher(), fewstep.Denoiser(student, prediction, SCHEDULE), skip=2, w_min=0.5, w_max=2.0,
                 null_cond={"c": -0.2}, target=target, loss=loss)
    initial = (student.s.detach().clone(), student.b.detach().clone())
    with torch.no_grad():  # the student moves on; an EMA target still holds the initial weights
        student.s.add_(0.05)
        student.b.mul_(-1.5)
    x0, noise = tiny_batch()
    solver_index = torch.tensor([0, 7, 49])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got, logs = method.consistency_loss(x0, {"c": 0.3}, noise=noise, solver_index=solver_index, w=w)
    got.backward()

    t = torch.tensor([19, 159, 999])  # 50-step grid [19, 39, ..., 999]; skip 2: t_prev = t - 40, clamped at 0
    t_prev = torch.tensor([0, 119, 959])
    s, b = student.s.detach().clone().requires_grad_(), student.b.detach().clone().requires_grad_()
    target_params = initial if target == "ema" else (s.detach(), b.detach())
    want = hand_lcd_loss(x0, noise, t, t_prev, w, (s, b), target_params, prediction, loss)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=0)
    torch.testing.assert_close(logs["loss"].double(), want.detach(), rtol=1e-10, atol=0)
    assert not logs["loss"].requires_grad
    torch.testing.assert_close(student.b.grad, b.grad, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(student.s.grad, s.grad, rtol=1e-9, atol=1e-15)
    if target == "ema":
        assert all(p.grad is None for p in method.ema_target.parameters())


def test_no_guidance_calls_the_teacher_once_and_needs_no_uncond():
    calls = []
    model = CondTeacher()
    model.register_forward_hook(lambda mod, args, out: calls.append(1))
    method = LCD(fewstep.Denoiser(model, "eps", SCHEDULE), Affine(3), w_min=0.0, w_max=0.0)
    x0, noise = tiny_batch()
    loss, _ = method.loss("student", {"x0": x0, "noise": noise}, 0)
    assert len(calls) == 1 and torch.isfinite(loss)


def test_w_embedding_is_given_to_student_and_target():
    student = Affine(3)
    method = LCD(teacher(), student, w_min=1.0, w_max=3.0, null_cond={"c": -0.2}, w_embedding=9,
                 w_embedding_kwarg="timestep_cond")
    x0, noise = tiny_batch()
    w = torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64)
    method.consistency_loss(x0, {"c": 0.3}, noise=noise, w=w)
    emb = student.calls[-1]["timestep_cond"]
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(4)])
    angles = 1000 * w.float()[:, None] * freqs
    want = torch.cat([angles.sin(), angles.cos(), torch.zeros(3, 1)], 1)  # odd size: one zero pad
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-5)
    assert student.calls[-1]["c"] == 0.3
    target_calls = method.ema_target.model.calls
    torch.testing.assert_close(target_calls[-1]["timestep_cond"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guidance_embedding(w, 9), want, rtol=1e-5, atol=1e-5)


def test_ema_target_update():
    student = Affine(3)
    method = LCD(teacher(), student, w_min=0.0, w_max=0.0, ema_decay=0.95)
    before = [p.detach().clone() for p in method.ema_target.parameters()]
    with torch.no_grad():
        student.s.add_(0.3)
        student.b.add_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    method.after_step("student", 0)
    for ema, old, new in zip(method.ema_target.parameters(), before, student.parameters()):
        torch.testing.assert_close(ema, 0.95 * old + 0.05 * new.detach(), rtol=1e-12, atol=1e-15)
        assert not ema.requires_grad
    self_target = LCD(teacher(), Affine(3), w_min=0.0, w_max=0.0, target="self")
    assert self_target.ema_target is None
    self_target.after_step("student", 0)  # nothing to update


class MLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3):
        super().__init__()
        blocks = [nn.Linear(dim + 32, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, dim))

    def forward(self, x, t):
        freqs = torch.exp(torch.arange(16, device=x.device) * (-math.log(1000.0) / 15))
        angles = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) * freqs
        return self.net(torch.cat([x, angles.sin(), angles.cos()], 1))


def test_lora_mode_trains_only_the_adapters(one_thread):
    torch.manual_seed(0)
    net = MLP(hidden=16, layers=2)
    x, t = torch.randn(5, 2), torch.tensor([999, 500, 20, 3, 0])
    with torch.no_grad():
        base_out = net(x, t)
    add_lora(net, rank=4)
    lora = {n for n, p in net.named_parameters() if "lora_" in n}
    assert lora and {n for n, p in net.named_parameters() if p.requires_grad} == lora
    adapters_off = []
    lora_layers = [m for m in net.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    net.register_forward_hook(lambda mod, args, out: adapters_off.append(lora_layers[0].disable_adapters))

    method = LCD(fewstep.Denoiser(net, "eps", SCHEDULE), net, w_min=0.0, w_max=0.0, target="self")
    assert "teacher" not in dict(method.named_children())  # its weights are the student's: not saved twice
    trained = method.parameters_of("student")
    assert {id(p) for p in trained} == {id(p) for n, p in net.named_parameters() if n in lora}
    base = {n: p.detach().clone() for n, p in net.named_parameters() if n not in lora}
    opt = torch.optim.Adam(trained, lr=1e-2)
    for step in range(3):
        loss, _ = method.loss("student", {"x0": torch.randn(16, 2)}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step("student", step)
    assert adapters_off[:3] == [True, False, False]  # teacher (base network), target (self), student
    for n, p in net.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"{n}: a base weight changed"
    assert {n for n, p in net.named_parameters() if p.requires_grad} == lora  # restored after the teacher call
    assert any(p.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        with lora_disabled(net):
            torch.testing.assert_close(net(x, t), base_out)
        assert not torch.allclose(net(x, t), base_out)


def test_sample_one_step_is_the_consistency_function():
    student = Affine(3)
    method = LCD(teacher(), fewstep.Denoiser(student, "x0", SCHEDULE), w_min=0.0, w_max=0.0)
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = method.sample(noise, 1)
    c_skip, c_out = boundary(torch.tensor(999))
    with torch.no_grad():
        want = c_skip * noise + c_out * (student.s * noise + student.b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    four = method.sample(noise, 4)
    assert four.shape == noise.shape and torch.isfinite(four).all()
    assert [int(t) for t in method.sampler.timesteps] == [999, 759, 499, 259]


def test_bad_input():
    with pytest.raises(ValueError, match="teacher: expected a Denoiser on a VPSchedule"):
        LCD(fewstep.Denoiser(CondTeacher(), "flow"), Affine(3))
    with pytest.raises(TypeError, match="teacher: expected a fewstep.Denoiser"):
        LCD(CondTeacher(), Affine(3))
    with pytest.raises(ValueError, match="student: expected a Denoiser on the teacher's schedule"):
        LCD(teacher(), fewstep.Denoiser(Affine(3), "eps", fewstep.VPSchedule(beta_schedule="scaled_linear")))
    with pytest.raises(ValueError, match="target: expected one of"):
        LCD(teacher(), Affine(3), target="online")
    with pytest.raises(ValueError, match="loss: expected one of"):
        LCD(teacher(), Affine(3), loss="l1")
    with pytest.raises(ValueError, match=r"skip: expected an int in \[1, 50\]"):
        LCD(teacher(), Affine(3), skip=0)
    with pytest.raises(ValueError, match="w_min, w_max: expected 0 <= w_min <= w_max"):
        LCD(teacher(), Affine(3), w_min=3.0, w_max=1.0)
    with pytest.raises(ValueError, match="w_embedding: expected None or an int"):
        LCD(teacher(), Affine(3), w_embedding=2)
    shared = CondTeacher()
    with pytest.raises(ValueError, match="student: is the teacher's own module without LoRA"):
        LCD(fewstep.Denoiser(shared, "eps", SCHEDULE), shared)
    x0, noise = tiny_batch()
    with pytest.raises(ValueError, match="uncond"):  # guidance without unconditional kwargs
        LCD(teacher(), Affine(3)).loss("student", {"x0": x0}, 0)
    with pytest.raises(ValueError, match=r"batch\['x0'\]: expected a floating tensor"):
        LCD(teacher(), Affine(3), w_max=0.0, w_min=0.0).loss("student", {"noise": noise}, 0)
    with pytest.raises(ValueError, match="phase: expected one of"):
        LCD(teacher(), Affine(3), w_max=0.0, w_min=0.0).loss("critic", {"x0": x0}, 0)


def ring_mixture() -> GaussianMixtureDenoiser:
    toy = GaussianMixtureDenoiser(ABAR_SD, shape=(2,), num_modes=8, std=0.1)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    toy.means.copy_(torch.stack([angles.cos(), angles.sin()], 1))
    return toy


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256) -> float:
    dirs = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def test_distilled_4_step_student_beats_teacher_ddim(one_thread):
    """The exact teacher's 4-step DDIM blurs the 8-mode ring; a few hundred LCD steps of an MLP from
    scratch give 4-step samples clearly closer to the data (sliced W2). From scratch, a 10-interval
    solver step spreads the boundary condition in 5 hops instead of 50, and L2 converges faster
    than pseudo-Huber with c = 0.001 (an L1 at these scales)."""
    torch.manual_seed(0)
    toy = ring_mixture()
    schedule = fewstep.VPSchedule(ABAR_SD)
    teacher_sd = fewstep.Denoiser(toy, "eps", schedule)
    method = LCD(teacher_sd, fewstep.Denoiser(MLP(), "x0", schedule), w_min=0.0, w_max=0.0, skip=10, loss="l2")
    opt = torch.optim.Adam(method.parameters_of("student"), lr=3e-3)
    for step in range(500):
        loss, _ = method.loss("student", {"x0": toy.sample_data(256).float()}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step("student", step)

    gen = torch.Generator().manual_seed(1)
    data = toy.sample_data(2000, gen).float()
    noise = torch.randn(2000, 2, generator=gen)
    ddim = fewstep.samplers.DDIMSampler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    teacher_4 = sliced_w2(fewstep.samplers.sample(toy, noise, ddim, num_steps=4), data)
    student_4 = sliced_w2(method.sample(noise, 4), data)
    assert student_4 < 0.7 * teacher_4, f"LCD 4 steps: sliced W2 {student_4:.3f}, teacher DDIM 4 steps {teacher_4:.3f}"
