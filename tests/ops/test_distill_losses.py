"""fewstep.losses: pseudo-Huber, LCD's teacher step and loss, the denoising loss and the GAN losses
against the float64 references, diffusers' LCM conventions, autograd, opcheck and torch.compile."""
from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_close_to_reference, assert_close_to_reference_fp64, devices, poison_allocator, rel_err

import fewstep
from fewstep.losses import distill_losses_checks as checks
from fewstep.reference import distill_losses as ref

SHAPES = [(1, 4, 7, 9), (3, 4, 9, 11), (2, 3, 5, 6, 7), (2, 4, 64, 65)]  # batch 1, video, > 1 chunk
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EPS64 = torch.finfo(torch.float64).eps


def randn(shape, dtype, device, gen, noncontiguous=False, scale=1.0):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if noncontiguous:  # same values, transposed storage
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.to(device, dtype)


def sd_alphas_cumprod(device="cpu", dtype=torch.float64):
    """Stable Diffusion's scaled-linear schedule, as diffusers builds it."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(device, dtype)


def timesteps(batch, device, gen):
    t = torch.randint(20, 1000, (batch,), generator=gen)
    return t.to(device), (t - 20).to(device)


# The same math done by PyTorch in fp32 bounds the kernels' error at every dtype: its result rounded
# to fp16/bf16, and for fp64 its error scaled by the ratio of the unit roundoffs.
SAME_OP = torch.float32


def loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_loss(loss, ref64, same_op, dtype, what):
    assert loss.dtype == loss_dtype(dtype) and loss.dim() == 0, what
    if dtype == torch.float64:  # sequential fp64 sums over 2048-element chunks: 2048 eps
        torch.testing.assert_close(loss, ref64, rtol=2048 * EPS64, atol=0, msg=what)
    else:
        assert_close_to_reference(loss.reshape(1), ref64.reshape(1), same_op.reshape(1).to(loss.dtype), what)


def check_elementwise(out, ref64, same_op, dtype, what):
    assert out.dtype == dtype and out.shape == ref64.shape, what
    if dtype == torch.float64:
        assert_close_to_reference_fp64(out, ref64, same_op, what)
    else:
        assert_close_to_reference(out, ref64, same_op.to(dtype), what)


def grads(fn, inputs, dtype):
    """Gradients of fn(*inputs) (a loss) w.r.t. the inputs, computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves)


# ---------------------------------------------------------------- pseudo-Huber and denoising


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_pseudo_huber_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(0)
    for i, shape in enumerate(SHAPES + [(), (5,)]):
        pred = randn(shape, dtype, device, gen, noncontiguous=i % 2 == 1 and len(shape) > 1)
        target = randn(shape, dtype, device, gen)
        c = 0.05
        loss = torch.ops.fewstep.pseudo_huber_loss(pred, target, c)
        poison_allocator(pred)
        grad = torch.ops.fewstep.pseudo_huber_loss_backward(torch.tensor(1.0, dtype=loss.dtype, device=device),
                                                            pred, target, c)
        fn = lambda p, t: ref.pseudo_huber_reference(p, t, c, p.dtype)  # noqa: E731
        ref64 = fn(pred.double(), target.double())
        same = fn(pred.to(SAME_OP), target.to(SAME_OP))
        check_loss(loss, ref64, same, dtype, f"loss {shape}")
        g64 = grads(fn, (pred, target), torch.float64)[0]
        g_same = grads(fn, (pred, target), SAME_OP)[0]
        check_elementwise(grad, g64, g_same, dtype, f"grad {shape}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_denoising_matches_reference(device, dtype, weighted):
    gen = torch.Generator().manual_seed(1)
    for i, shape in enumerate(SHAPES + [(7,)]):
        pred = randn(shape, dtype, device, gen, noncontiguous=i % 2 == 1)
        target = randn(shape, dtype, device, gen)
        weight = (torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5).to(device) if weighted else None
        loss, sample_means = torch.ops.fewstep.denoising_loss(pred, target, weight)
        poison_allocator(pred)
        one = torch.tensor(1.0, dtype=loss.dtype, device=device)
        grad = torch.ops.fewstep.denoising_loss_backward(one, pred, target, weight)
        fn = lambda p, t: ref.denoising_reference(p, t, weight, p.dtype)[0]  # noqa: E731
        ref64, means64 = ref.denoising_reference(pred, target, weight)
        same = fn(pred.to(SAME_OP), target.to(SAME_OP))
        check_loss(loss, ref64, same, dtype, f"loss {shape}")
        assert sample_means.dtype == torch.float64 and sample_means.shape == (shape[0],)
        torch.testing.assert_close(sample_means, means64, rtol=2048 * EPS64 if dtype == torch.float64 else 1e-6,
                                   atol=0)
        g64 = grads(fn, (pred, target), torch.float64)[0]
        g_same = grads(fn, (pred, target), SAME_OP)[0]
        check_elementwise(grad, g64, g_same, dtype, f"grad {shape}")


@pytest.mark.parametrize("device", devices())
def test_wrappers_give_gradients_to_every_differentiable_input(device):
    gen = torch.Generator().manual_seed(2)
    pred, target = randn((3, 2, 5, 7), torch.float64, device, gen), randn((3, 2, 5, 7), torch.float64, device, gen)
    weight = torch.rand(3, generator=gen, dtype=torch.float64).to(device)
    real, fake = randn((3, 1, 5), torch.float64, device, gen), randn((6,), torch.float64, device, gen)
    cases = [
        (lambda p, t: fewstep.losses.pseudo_huber(p, t, c=0.1), lambda p, t: ref.pseudo_huber_reference(p, t, 0.1),
         (pred, target)),
        (lambda p, t, w: fewstep.losses.denoising(p, t, w), lambda p, t, w: ref.denoising_reference(p, t, w)[0],
         (pred, target, weight)),
        (fewstep.losses.gan_discriminator, ref.gan_discriminator_reference, (real, fake)),
        (fewstep.losses.gan_generator, ref.gan_generator_reference, (fake,)),
    ]
    for fused, reference, inputs in cases:
        for g, g_ref in zip(grads(fused, inputs, torch.float64), grads(reference, inputs, torch.float64)):
            torch.testing.assert_close(g, g_ref, rtol=64 * EPS64, atol=0)


# ---------------------------------------------------------------- GAN


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gan_losses_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(3)
    for real_shape, fake_shape in [((1,), (1,)), ((3, 1), (5,)), ((2, 1, 13, 13), (2, 1, 13, 13)), ((4099,), (3, 7))]:
        real = randn(real_shape, dtype, device, gen, scale=4.0)
        fake = randn(fake_shape, dtype, device, gen, scale=4.0)
        d_loss = torch.ops.fewstep.gan_discriminator_loss(real, fake)
        g_loss = torch.ops.fewstep.gan_generator_loss(fake)
        one = torch.tensor(1.0, dtype=d_loss.dtype, device=device)
        d_real = torch.ops.fewstep.softplus_mean_backward(one, real, -1.0)
        d_fake = torch.ops.fewstep.softplus_mean_backward(one, fake, 1.0)
        g_fake = torch.ops.fewstep.softplus_mean_backward(one, fake, -1.0)
        check_loss(d_loss, ref.gan_discriminator_reference(real, fake),
                   ref.gan_discriminator_reference(real, fake, SAME_OP), dtype, f"D loss {real_shape}")
        check_loss(g_loss, ref.gan_generator_reference(fake), ref.gan_generator_reference(fake, SAME_OP), dtype,
                   f"G loss {fake_shape}")
        for out, fn, inputs, index in [
            (d_real, lambda r, f: ref.gan_discriminator_reference(r, f, r.dtype), (real, fake), 0),
            (d_fake, lambda r, f: ref.gan_discriminator_reference(r, f, r.dtype), (real, fake), 1),
            (g_fake, lambda f: ref.gan_generator_reference(f, f.dtype), (fake,), 0),
        ]:
            check_elementwise(out, grads(fn, inputs, torch.float64)[index], grads(fn, inputs, SAME_OP)[index], dtype,
                              f"grad {index} {real_shape} {fake_shape}")


@pytest.mark.parametrize("device", devices())
def test_gan_losses_are_stable_for_large_logits(device):
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0], device=device)
    loss = fewstep.losses.gan_generator(logits)
    torch.testing.assert_close(loss.double(), ref.gan_generator_reference(logits), rtol=1e-7, atol=0)
    x = logits.clone().requires_grad_(True)
    fewstep.losses.gan_discriminator(x, x).backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- LCD


def lcd_inputs(shape, dtype, device, gen, noncontiguous=False):
    x_t, out_a, out_b, x_prev = (randn(shape, dtype, device, gen, noncontiguous) for _ in range(4))
    t, t_prev = timesteps(shape[0], device, gen)
    return x_t, out_a, out_b, x_prev, t, t_prev


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_lcd_teacher_step_matches_reference(device, dtype, prediction):
    gen = torch.Generator().manual_seed(4)
    for i, shape in enumerate(SHAPES):
        x_t, cond, uncond, _, t, t_prev = lcd_inputs(shape, dtype, device, gen, noncontiguous=i % 2 == 1)
        table = sd_alphas_cumprod(device, torch.float32 if i % 2 else torch.float64)
        scales = [6.5, torch.rand(shape[0], generator=gen).to(device) * 10 + 5]
        for w in scales:
            per_sample = isinstance(w, torch.Tensor)
            poison_allocator(x_t)
            out = torch.ops.fewstep.lcd_teacher_step(x_t, cond, uncond, t, t_prev, 0.0 if per_sample else w,
                                                     w if per_sample else None, table, prediction)
            args = (x_t, cond, uncond, t, t_prev, w, table, prediction)
            ref64 = ref.lcd_teacher_step_reference(*args)
            same = ref.lcd_teacher_step_reference(*args, dtype=SAME_OP)
            check_elementwise(out, ref64, same, dtype, f"x_prev {shape} per_sample={per_sample}")


LOSS_CASES = [(p, l) for p in ("eps", "x0", "v") for l in ("huber", "l2")]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction,loss_kind", LOSS_CASES)
def test_lcd_loss_matches_reference(device, dtype, prediction, loss_kind):
    gen = torch.Generator().manual_seed(5)
    for i, shape in enumerate(SHAPES):
        x_t, student, target, x_prev, t, t_prev = lcd_inputs(shape, dtype, device, gen, noncontiguous=i % 2 == 1)
        table = sd_alphas_cumprod(device)
        scalars = (prediction, loss_kind, 0.001, 0.5, 10.0)
        loss = torch.ops.fewstep.lcd_loss(student, x_t, t, target, x_prev, t_prev, table, *scalars)
        poison_allocator(x_t)
        one = torch.tensor(1.0, dtype=loss.dtype, device=device)
        grad = torch.ops.fewstep.lcd_loss_backward(one, student, x_t, t, target, x_prev, t_prev, table, *scalars)

        def fn(s, dtype=torch.float64):
            return ref.lcd_reference(s, x_t, t, target, x_prev, t_prev, table, *scalars, dtype=dtype)

        check_loss(loss, fn(student), fn(student, SAME_OP), dtype, f"loss {shape}")
        g64 = grads(fn, (student,), torch.float64)[0]
        g_same = grads(lambda s: fn(s, SAME_OP), (student,), SAME_OP)[0]
        check_elementwise(grad, g64, g_same, dtype, f"grad {shape}")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_lcd_follows_diffusers_lcm_training_conventions(prediction):
    """The LCM distillation script's chain (diffusers examples/consistency_distillation), written out
    with diffusers' own scheduler pieces: LCMScheduler's boundary scalings and DDPMScheduler's table."""
    from diffusers import DDPMScheduler, LCMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    lcm = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    table = sched.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(6)
    shape = (3, 4, 8, 8)
    x_t, cond, uncond, _, t, t_prev = lcd_inputs(shape, torch.float64, "cpu", gen)
    t[0], t_prev[0] = 19, 0  # the solver's first step ends at t = 0
    w = torch.tensor([4.0, 9.5, 14.0], dtype=torch.float64)
    student, target = randn(shape, torch.float64, "cpu", gen), randn(shape, torch.float64, "cpu", gen)
    bc = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731

    def x0_eps(out, x, steps):  # the script's get_predicted_original_sample / get_predicted_noise
        a = bc(table[steps])
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        if prediction == "eps":
            return (x - sigma * out) / alpha, out
        if prediction == "x0":
            return out, (x - alpha * out) / sigma
        return alpha * x - sigma * out, alpha * out + sigma * x

    x0_c, eps_c = x0_eps(cond, x_t, t)
    x0_u, eps_u = x0_eps(uncond, x_t, t)
    x0_w, eps_w = x0_c + bc(w) * (x0_c - x0_u), eps_c + bc(w) * (eps_c - eps_u)
    a_prev = bc(table[t_prev])
    x_prev = a_prev.sqrt() * x0_w + (1 - a_prev).sqrt() * eps_w  # DDIMSolver.ddim_step
    torch.testing.assert_close(fewstep.losses.lcd_teacher_step(x_t, cond, uncond, t, t_prev, w, table, prediction),
                               x_prev, rtol=1e-12, atol=1e-12)

    def scalings(steps):
        pairs = [lcm.get_scalings_for_boundary_condition_discrete(int(s)) for s in steps]
        return bc(torch.tensor([p[0] for p in pairs], dtype=torch.float64)), \
            bc(torch.tensor([p[1] for p in pairs], dtype=torch.float64))

    s = student.clone().requires_grad_(True)
    c_skip_start, c_out_start = scalings(t)
    c_skip, c_out = scalings(t_prev)
    model_pred = c_skip_start * x_t + c_out_start * x0_eps(s, x_t, t)[0]
    with torch.no_grad():
        target_pred = c_skip * x_prev + c_out * x0_eps(target, x_prev, t_prev)[0]
    expected = torch.mean(torch.sqrt((model_pred - target_pred) ** 2 + 0.001**2) - 0.001)
    expected.backward()
    sf = student.clone().requires_grad_(True)
    loss = fewstep.losses.lcd(sf, x_t, t, target, x_prev, t_prev, table, prediction)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(sf.grad, s.grad, rtol=1e-10, atol=1e-18)


@pytest.mark.parametrize("device", devices())
def test_out_of_range_timesteps_give_nan_not_a_crash(device):
    gen = torch.Generator().manual_seed(7)
    x_t, cond, uncond, x_prev, t, t_prev = lcd_inputs((3, 2, 4, 4), torch.float32, device, gen)
    t[1] = 1000
    t_prev[2] = -1
    table = sd_alphas_cumprod(device)
    for backend in ("cpu" if device == "cpu" else "cuda", "reference"):
        with fewstep.backend(backend):
            out = fewstep.losses.lcd_teacher_step(x_t, cond, uncond, t, t_prev, 3.0, table)
            loss = fewstep.losses.lcd(cond, x_t, t, uncond, x_prev, t_prev, table)
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all() and torch.isnan(out[2]).all(), backend
        assert torch.isnan(loss), backend


# ---------------------------------------------------------------- autograd, opcheck, compile


def test_forward_ops_gradcheck_float64():
    gen = torch.Generator().manual_seed(8)
    shape = (2, 3, 4, 5)
    p, q = randn(shape, torch.float64, "cpu", gen), randn(shape, torch.float64, "cpu", gen)
    w = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    x_t, cond, uncond, x_prev, t, t_prev = lcd_inputs(shape, torch.float64, "cpu", gen)
    table = sd_alphas_cumprod()
    scales = torch.tensor([3.0, 8.0], dtype=torch.float64)
    leaf = lambda *ts: [v.clone().requires_grad_(True) for v in ts]  # noqa: E731
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fewstep.pseudo_huber_loss(a, b, 0.3), leaf(p, q))
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.fewstep.denoising_loss(a, b, c)[0], leaf(p, q, w))
    for prediction, loss in LOSS_CASES:
        assert torch.autograd.gradcheck(
            lambda s: torch.ops.fewstep.lcd_loss(s, x_t, t, q, x_prev, t_prev, table, prediction, loss, 0.3, 0.5,
                                                 10.0), leaf(p))
    for prediction in ("eps", "x0", "v"):
        assert torch.autograd.gradcheck(
            lambda x, c, u, s: torch.ops.fewstep.lcd_teacher_step(x, c, u, t, t_prev, 0.0, s, table, prediction),
            leaf(x_t, cond, uncond, scales))
        assert torch.autograd.gradcheck(
            lambda x, c, u: torch.ops.fewstep.lcd_teacher_step(x, c, u, t, t_prev, 2.5, None, table, prediction),
            leaf(x_t, cond, uncond))
    assert torch.autograd.gradcheck(torch.ops.fewstep.gan_discriminator_loss, leaf(p[:1].flatten()[:7], q))
    assert torch.autograd.gradcheck(torch.ops.fewstep.gan_generator_loss, leaf(q))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    gen = torch.Generator().manual_seed(9)
    shape = (2, 3, 5, 7)
    p, q = randn(shape, torch.float32, device, gen), randn(shape, torch.float32, device, gen)
    w = (torch.rand(2, generator=gen) + 0.5).to(device)
    x_t, cond, uncond, x_prev, t, t_prev = lcd_inputs(shape, torch.float32, device, gen)
    table = sd_alphas_cumprod(device)
    one = torch.tensor(0.7, device=device)
    req = lambda v: v.clone().requires_grad_(True)  # noqa: E731
    ops = torch.ops.fewstep
    lcd_args = (t, q, x_prev, t_prev, table, "v", "huber", 0.01, 0.5, 10.0)
    cases = [
        (ops.pseudo_huber_loss, (req(p), req(q), 0.01)),
        (ops.pseudo_huber_loss_backward, (one, p, q, 0.01)),
        (ops.pseudo_huber_loss_backward, (req(one), req(p), q, 0.01)),
        (ops.lcd_loss_backward, (req(one), req(p), req(x_t)) + lcd_args),
        (ops.denoising_loss, (req(p), req(q), req(w))),
        (ops.denoising_loss, (req(p), q, None)),
        (ops.denoising_loss_backward, (one, p, q, w)),
        (ops.lcd_loss, (req(p), x_t) + lcd_args),
        (ops.lcd_loss_backward, (one, p, x_t) + lcd_args),
        (ops.lcd_teacher_step, (req(x_t), req(cond), req(uncond), t, t_prev, 0.0, req(w), table, "eps")),
        (ops.lcd_teacher_step, (x_t, cond, uncond, t, t_prev, 7.5, None, table, "x0")),
        (ops.gan_discriminator_loss, (req(p[:, :1]), req(q))),
        (ops.gan_generator_loss, (req(q),)),
        (ops.softplus_mean_backward, (one, q, -1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(10)
    shape = (2, 3, 5, 7)
    x_t, cond, uncond, x_prev, t, t_prev = lcd_inputs(shape, torch.float32, device, gen)
    table = sd_alphas_cumprod(device)
    w = (torch.rand(2, generator=gen) + 0.5).to(device)

    def step(student, logits):
        target = fewstep.losses.lcd_teacher_step(x_t, cond, uncond, t, t_prev, w * 5, table)
        return (fewstep.losses.lcd(student, x_t, t, uncond, target, t_prev, table, "eps", "l2")
                + fewstep.losses.pseudo_huber(student, cond) + fewstep.losses.denoising(student, cond, w)
                + fewstep.losses.gan_generator(logits) + fewstep.losses.gan_discriminator(logits, logits * 2))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    student, logits = randn(shape, torch.float32, device, gen), randn((2, 1), torch.float32, device, gen)
    se, le = student.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    sc, lc = student.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    eager = step(se, le)
    eager.backward()
    out = compiled(sc, lc)
    out.backward()
    assert torch.equal(eager, out) and torch.equal(se.grad, sc.grad) and torch.equal(le.grad, lc.grad)


@pytest.mark.parametrize("device", devices())
def test_deterministic(device):
    gen = torch.Generator().manual_seed(11)
    p, q = randn((5, 4, 64, 64), torch.float32, device, gen), randn((5, 4, 64, 64), torch.float32, device, gen)
    w = torch.rand(5, generator=gen).to(device)
    a = torch.ops.fewstep.denoising_loss(p, q, w)
    b = torch.ops.fewstep.denoising_loss(p, q, w)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.ops.fewstep.pseudo_huber_loss(p, q, 0.001), torch.ops.fewstep.pseudo_huber_loss(p, q, 0.001))
    assert torch.equal(torch.ops.fewstep.gan_discriminator_loss(p, q), torch.ops.fewstep.gan_discriminator_loss(p, q))


@pytest.mark.parametrize("device", devices())
def test_reference_backend_agrees(device):
    gen = torch.Generator().manual_seed(12)
    shape = (3, 2, 5, 7)
    x_t, cond, uncond, x_prev, t, t_prev = lcd_inputs(shape, torch.float32, device, gen)
    table = sd_alphas_cumprod(device)
    w = (torch.rand(3, generator=gen) + 0.5).to(device)

    def run(backend):
        s = cond.clone().requires_grad_(True)
        with fewstep.backend(backend):
            x_p = fewstep.losses.lcd_teacher_step(x_t, s, uncond, t, t_prev, w * 9, table, "v")
            loss = (fewstep.losses.lcd(s, x_t, t, uncond, x_prev, t_prev, table, "v") + fewstep.losses.pseudo_huber(s, x_p)
                    + fewstep.losses.denoising(s, uncond, w) + fewstep.losses.gan_discriminator(s[:, 0], x_p)
                    + fewstep.losses.gan_generator(s))
        loss.backward()
        return loss, s.grad

    compiled = run("cpu" if device == "cpu" else "cuda")
    reference = run("reference")
    # both in fp32; the gradient norm-wise, as pseudo-Huber's is ill-conditioned where |pred - target| ~ c
    torch.testing.assert_close(compiled[0], reference[0], rtol=1e-5, atol=0)
    assert rel_err(compiled[1], reference[1]) < 1e-5


# ---------------------------------------------------------------- bad input

_G = torch.Generator().manual_seed(13)
_P, _Q = torch.randn(2, 3, 5, generator=_G), torch.randn(2, 3, 5, generator=_G)
_T, _TP = torch.tensor([500, 999]), torch.tensor([480, 979])
_TABLE = sd_alphas_cumprod()

BAD = [
    ("pseudo_huber", lambda: fewstep.losses.pseudo_huber(_P, _Q[:1]), ValueError,
     "target: expected shape [2, 3, 5] (the shape of pred), got [1, 3, 5]"),
    ("pseudo_huber", lambda: fewstep.losses.pseudo_huber(_P, _Q.double()), TypeError,
     "target: expected dtype torch.float32 (the dtype of pred), got torch.float64"),
    ("pseudo_huber", lambda: fewstep.losses.pseudo_huber(_P, _Q, c=-0.5), ValueError,
     "c: expected a positive number, got -0.5"),
    ("pseudo_huber", lambda: fewstep.losses.pseudo_huber(_P.long(), _Q.long()), TypeError, "pred: expected dtype in"),
    ("denoising", lambda: fewstep.losses.denoising(_P, _Q, torch.ones(3)), ValueError,
     "weight: expected shape [2] (one weight per sample of pred), got [3]"),
    ("denoising", lambda: fewstep.losses.denoising(_P[0, 0, 0], _Q[0, 0, 0]), ValueError,
     "pred: expected a batch of samples [B, ...], got shape []"),
    ("lcd_teacher_step", lambda: fewstep.losses.lcd_teacher_step(_P, _Q, _Q, _T.int(), _TP, 3.0, _TABLE), TypeError,
     "t: expected dtype in ['torch.int64'], got torch.int32"),
    ("lcd_teacher_step", lambda: fewstep.losses.lcd_teacher_step(_P, _Q, _Q, _T, _TP[:1], 3.0, _TABLE), ValueError,
     "t_prev: expected shape [2] (one timestep per sample of x_t), got [1]"),
    ("lcd_teacher_step", lambda: fewstep.losses.lcd_teacher_step(_P, _Q, _Q, _T, _TP, float("nan"), _TABLE),
     ValueError, "guidance_scale: expected a finite number, got nan"),
    ("lcd_teacher_step", lambda: fewstep.losses.lcd_teacher_step(_P, _Q, _Q, _T, _TP, torch.ones(2, 1), _TABLE),
     ValueError, "guidance_scale: expected shape [2] (one scale per sample of x_t), got [2, 1]"),
    ("lcd_teacher_step", lambda: fewstep.losses.lcd_teacher_step(_P, _Q, _Q, _T, _TP, 3.0, _TABLE[None]), ValueError,
     "alphas_cumprod: expected a 1-D table indexed by timestep, got shape [1, 1000]"),
    ("lcd_teacher_step", lambda: fewstep.losses.lcd_teacher_step(_P, _Q, _Q, _T, _TP, 3.0, _TABLE, "sample"),
     ValueError, "prediction: expected one of ['eps', 'x0', 'v'], got 'sample'"),
    ("lcd", lambda: fewstep.losses.lcd(_P, _Q, _T, _Q, _Q.half(), _TP, _TABLE), TypeError,
     "x_prev: expected dtype torch.float32 (the dtype of student_out), got torch.float16"),
    ("lcd", lambda: fewstep.losses.lcd(_P, _Q, _T, _Q, _Q, _TP, _TABLE, loss="l1"), ValueError,
     "loss: expected one of ['huber', 'l2'], got 'l1'"),
    ("lcd", lambda: fewstep.losses.lcd(_P, _Q, _T, _Q, _Q, _TP, _TABLE, huber_c=0.0), ValueError,
     "huber_c: expected a positive number, got 0"),
    ("lcd", lambda: fewstep.losses.lcd(_P, _Q, _T, _Q, _Q, _TP, _TABLE, sigma_data=float("inf")), ValueError,
     "sigma_data: expected a finite number, got inf"),
    ("gan", lambda: fewstep.losses.gan_discriminator(_P.double(), _Q), TypeError,
     "real_logits: expected dtype torch.float32 (the dtype of fake_logits), got torch.float64"),
    ("gan", lambda: fewstep.losses.gan_discriminator(None, _Q), TypeError,
     "real_logits: expected a torch.Tensor, got NoneType"),
    ("gan", lambda: fewstep.losses.gan_generator(torch.empty(0)), ValueError,
     "fake_logits: expected a non-empty tensor, got shape [0]"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", BAD, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD)])
def test_bad_input_names_the_argument(backend, case):
    """The C++ checks (cpu) and their Python mirror (reference, fake) say the same thing."""
    _, call, error, message = case
    if message == "huber_c: expected a positive number, got 0" and backend == "reference":
        message = "huber_c: expected a positive number, got 0.0"  # Python's repr of the float
    with fewstep.backend(backend), pytest.raises(error, match=re.escape(message)):
        call()


def test_backward_ops_check_grad_loss():
    one = torch.tensor(1.0)
    with pytest.raises(TypeError, match=re.escape("grad_loss: expected dtype torch.float32, got torch.float64")):
        torch.ops.fewstep.pseudo_huber_loss_backward(one.double(), _P, _Q, 0.1)
    with pytest.raises(ValueError, match=re.escape("grad_loss: expected a 0-dim tensor on cpu, got shape [1]")):
        torch.ops.fewstep.denoising_loss_backward(one.reshape(1), _P, _Q, None)
    with pytest.raises(ValueError, match=re.escape("sign: expected 1.0 or -1.0, got 2")):
        torch.ops.fewstep.softplus_mean_backward(one, _P, 2.0)


def test_fake_checks_match_the_kernel_checks():
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        p, q = mode.from_tensor(_P), mode.from_tensor(_Q)
        with pytest.raises(ValueError, match=re.escape("target: expected shape [2, 3, 5] (the shape of pred)")):
            torch.ops.fewstep.pseudo_huber_loss(p, q[:1], 0.1)
    with pytest.raises(ValueError, match=re.escape("c: expected a positive number")):
        checks.check_pseudo_huber(_P, _Q, 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_lcd_on_noised_data_near_t_max(device, dtype, prediction):
    """Real inputs cancel: x_t = alpha x0 + sigma eps and an eps-prediction close to eps make x0's
    estimate a small difference of large terms (1/alpha ~ 15 at t = 999)."""
    gen = torch.Generator().manual_seed(14)
    shape = (4, 4, 16, 17)
    table = sd_alphas_cumprod(device)
    t = torch.tensor([999, 990, 960, 500], device=device)
    t_prev = t - 20
    a = table[t].view(-1, 1, 1, 1).cpu()
    x0, eps = randn(shape, torch.float64, "cpu", gen), randn(shape, torch.float64, "cpu", gen)
    noisy = lambda v, n: (a.sqrt() * v + (1 - a).sqrt() * n)  # noqa: E731
    x_t = noisy(x0, eps)
    if prediction == "eps":
        outs = [eps + 0.05 * randn(shape, torch.float64, "cpu", gen) for _ in range(4)]
    else:
        outs = [a.sqrt() * eps - (1 - a).sqrt() * x0 + 0.05 * randn(shape, torch.float64, "cpu", gen)
                for _ in range(4)]
    x_t, cond, uncond, student, target = (v.to(device, dtype) for v in [x_t] + outs)
    x_prev = ref.lcd_teacher_step_reference(x_t, cond, uncond, t, t_prev, 8.0, table, prediction)
    check_elementwise(torch.ops.fewstep.lcd_teacher_step(x_t, cond, uncond, t, t_prev, 8.0, None, table, prediction),
                      x_prev, ref.lcd_teacher_step_reference(x_t, cond, uncond, t, t_prev, 8.0, table, prediction,
                                                             SAME_OP), dtype, "teacher step")
    x_prev = x_prev.to(dtype)
    scalars = (prediction, "huber", 0.001, 0.5, 10.0)

    def fn(s, dtype=torch.float64):
        return ref.lcd_reference(s, x_t, t, target, x_prev, t_prev, table, *scalars, dtype=dtype)

    loss = torch.ops.fewstep.lcd_loss(student, x_t, t, target, x_prev, t_prev, table, *scalars)
    check_loss(loss, fn(student), fn(student, SAME_OP), dtype, "loss")
    one = torch.tensor(1.0, device=device)
    grad = torch.ops.fewstep.lcd_loss_backward(one, student, x_t, t, target, x_prev, t_prev, table, *scalars)
    check_elementwise(grad, grads(fn, (student,), torch.float64)[0],
                      grads(lambda s: fn(s, SAME_OP), (student,), SAME_OP)[0], dtype, "grad")


def test_backward_ops_gradcheck_float64():
    """The backward ops are differentiable in every float input (double backward)."""
    gen = torch.Generator().manual_seed(15)
    shape = (2, 3, 4, 5)
    p, q = randn(shape, torch.float64, "cpu", gen), randn(shape, torch.float64, "cpu", gen)
    w = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    x_t, _, _, x_prev, t, t_prev = lcd_inputs(shape, torch.float64, "cpu", gen)
    table = sd_alphas_cumprod()
    g = torch.tensor(0.8, dtype=torch.float64)
    leaf = lambda *ts: [v.clone().requires_grad_(True) for v in ts]  # noqa: E731
    ops = torch.ops.fewstep
    assert torch.autograd.gradcheck(lambda a, b, c: ops.pseudo_huber_loss_backward(a, b, c, 0.3), leaf(g, p, q))
    assert torch.autograd.gradcheck(lambda a, b, c, d: ops.denoising_loss_backward(a, b, c, d), leaf(g, p, q, w))
    for prediction, loss in LOSS_CASES:
        assert torch.autograd.gradcheck(
            lambda a, s, x, o, xp: ops.lcd_loss_backward(a, s, x, t, o, xp, t_prev, table, prediction, loss, 0.3, 0.5,
                                                         10.0), leaf(g, p, x_t, q, x_prev))
    for sign in (1.0, -1.0):
        assert torch.autograd.gradcheck(lambda a, x: ops.softplus_mean_backward(a, x, sign), leaf(g, p))


def test_double_backward_gradient_penalty():
    """A gradient penalty on the discriminator (R1 style) goes through the backward op."""
    gen = torch.Generator().manual_seed(16)
    real = randn((4, 3), torch.float64, "cpu", gen).requires_grad_(True)
    fake = randn((4, 3), torch.float64, "cpu", gen)
    (g,) = torch.autograd.grad(fewstep.losses.gan_discriminator(real, fake), real, create_graph=True)
    g.square().sum().backward()
    r2 = real.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(ref.gan_discriminator_reference(r2, fake), r2, create_graph=True)
    g2.square().sum().backward()
    torch.testing.assert_close(real.grad, r2.grad, rtol=1e-12, atol=0)
