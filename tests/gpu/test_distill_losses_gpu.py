"""Distillation losses on the GPU: CUDA kernels against the float64 reference at latent sizes (many
chunks, many samples), deterministic, and forward + backward capturable as a CUDA graph (no host sync)."""
from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, assert_close_to_reference, assert_close_to_reference_fp64, poison_allocator

import fewstep
from fewstep.reference import distill_losses as ref

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")

# SD1.5-like, many samples (more than the finalize block's warps), a video latent with > 256 chunks
SHAPES = [(32, 4, 64, 64), (300, 3, 5, 7), (1, 16, 9, 60, 104)]


def table():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).cuda()


def inputs(shape, dtype, gen, count):
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to("cuda", dtype) for _ in range(count)]


def timesteps(batch, gen):
    t = torch.randint(20, 1000, (batch,), generator=gen)
    return t.cuda(), (t - 20).cuda()


def check_elementwise(out, ref64, same_op_fp32, what):
    """Error at most 2x PyTorch's own on the same math (fp32 for every dtype, see tests/ops)."""
    if out.dtype == torch.float64:
        assert_close_to_reference_fp64(out, ref64, same_op_fp32, what)
    else:
        assert_close_to_reference(out, ref64, same_op_fp32.to(out.dtype), what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_losses_match_reference(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    pred, target, x_t, x_prev = inputs(shape, dtype, gen, 4)
    t, t_prev = timesteps(shape[0], gen)
    alphas = table()
    weight = torch.rand(shape[0], generator=gen).cuda() + 0.5
    one = torch.tensor(1.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device="cuda")
    c = torch.float32  # the same math in PyTorch: its error bounds the kernels'
    checks = [
        (torch.ops.fewstep.pseudo_huber_loss(pred, target, 0.01),
         lambda d: ref.pseudo_huber_reference(pred, target, 0.01, d), "pseudo_huber"),
        (torch.ops.fewstep.denoising_loss(pred, target, weight)[0],
         lambda d: ref.denoising_reference(pred, target, weight, d)[0], "denoising"),
        (torch.ops.fewstep.lcd_loss(pred, x_t, t, target, x_prev, t_prev, alphas, "eps", "huber", 0.001, 0.5, 10.0),
         lambda d: ref.lcd_reference(pred, x_t, t, target, x_prev, t_prev, alphas, "eps", "huber", dtype=d), "lcd"),
        (torch.ops.fewstep.gan_discriminator_loss(pred, target),
         lambda d: ref.gan_discriminator_reference(pred, target, d), "gan_discriminator"),
    ]
    for loss, fn, what in checks:
        ref64 = fn(torch.float64)
        if dtype == torch.float64:
            torch.testing.assert_close(loss, ref64, rtol=4096 * 2.2e-16, atol=0, msg=what)
        else:
            assert_close_to_reference(loss.reshape(1), ref64.reshape(1), fn(c).reshape(1).float(), what)
    poison_allocator(pred)
    grads = [
        (torch.ops.fewstep.lcd_loss_backward(one, pred, x_t, t, target, x_prev, t_prev, alphas, "v", "l2", 0.001,
                                             0.5, 10.0),
         lambda p, d: ref.lcd_reference(p, x_t, t, target, x_prev, t_prev, alphas, "v", "l2", dtype=d), "lcd grad"),
        (torch.ops.fewstep.denoising_loss_backward(one, pred, target, weight),
         lambda p, d: ref.denoising_reference(p, target, weight, d)[0], "denoising grad"),
        (torch.ops.fewstep.softplus_mean_backward(one, pred, -1.0),
         lambda p, d: ref.gan_generator_reference(p, d), "gan grad"),
    ]
    for grad, fn, what in grads:
        expected = []
        for d in (torch.float64, c):
            leaf = pred.detach().to(d).requires_grad_(True)
            expected.append(torch.autograd.grad(fn(leaf, d), leaf)[0])
        check_elementwise(grad, expected[0], expected[1], what)
    scales = torch.rand(shape[0], generator=gen).cuda() * 10 + 5
    x_p = torch.ops.fewstep.lcd_teacher_step(x_t, pred, target, t, t_prev, 0.0, scales, alphas, "v")
    expected = ref.lcd_teacher_step_reference(x_t, pred, target, t, t_prev, scales, alphas, "v")
    same = ref.lcd_teacher_step_reference(x_t, pred, target, t, t_prev, scales, alphas, "v", dtype=c)
    check_elementwise(x_p, expected, same, "teacher step")


def test_cuda_matches_cpu_kernels_and_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    pred, target = inputs((16, 4, 64, 64), torch.float32, gen, 2)
    weight = torch.rand(16, generator=gen).cuda()
    a = torch.ops.fewstep.denoising_loss(pred, target, weight)
    b = torch.ops.fewstep.denoising_loss(pred, target, weight)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cpu = torch.ops.fewstep.denoising_loss(pred.cpu(), target.cpu(), weight.cpu())
    torch.testing.assert_close(a[0].cpu(), cpu[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[1].cpu(), cpu[1], rtol=1e-12, atol=0)  # both fp64 sums of fp32 terms


def test_forward_and_backward_capture_as_a_cuda_graph():
    """No host sync anywhere in the LCD head or the GAN / denoising losses: capture fails on a sync."""
    gen = torch.Generator().manual_seed(2)
    x_t, cond, uncond, target, x_prev = inputs((4, 4, 32, 32), torch.bfloat16, gen, 5)
    t, t_prev = timesteps(4, gen)
    alphas = table()
    w = torch.rand(4, generator=gen).cuda() * 10 + 5
    student = cond.clone().requires_grad_(True)
    logits = torch.randn(4, 1, device="cuda", requires_grad=True)

    def step():
        with torch.no_grad():
            x_p = fewstep.losses.lcd_teacher_step(x_t, cond, uncond, t, t_prev, w, alphas)
        loss = (fewstep.losses.lcd(student, x_t, t, target, x_p, t_prev, alphas) + fewstep.losses.denoising(student, target, w)
                + fewstep.losses.gan_generator(logits) + fewstep.losses.gan_discriminator(logits, logits)
                + fewstep.losses.pseudo_huber(student, target))
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    eager_grad = student.grad.clone()
    student.grad = None
    logits.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(student.grad, eager_grad)
