"""fewstep.losses.dmd: DMD2's generator loss against the float64 reference and DMD2's own form."""
from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_close_to_reference, devices

import fewstep
from fewstep.reference.dmd_loss import dmd_loss_reference

SHAPES = [(1, 4, 7, 9), (3, 4, 9, 11), (2, 3, 5, 6, 7), (2, 4, 64, 65)]  # batch 1, video, > 1 chunk


def inputs(shape, dtype, device, gen, noncontiguous=False):
    ts = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    if noncontiguous:  # same values, transposed storage
        ts = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in ts]
    return [t.to(device, dtype) for t in ts]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [False, True])
def test_matches_reference(device, dtype, cfg):
    gen = torch.Generator().manual_seed(0)
    for i, shape in enumerate(SHAPES):
        x, real, uncond, fake = inputs(shape, dtype, device, gen, noncontiguous=i % 2 == 1)
        args = (x, real, uncond if cfg else None, 4.5 if cfg else 1.0, fake)
        loss, norm = torch.ops.fewstep.dmd_loss(*args)
        grad = torch.full_like(x, float("nan"))  # poisoned: the backward must write every element
        grad.copy_(torch.ops.fewstep.dmd_loss_backward(torch.ones_like(loss), *args[1:], norm))
        ref_loss, ref_grad = dmd_loss_reference(*args)
        in_dtype = dmd_loss_reference(*args, dtype=dtype if dtype != torch.bfloat16 else torch.float32)
        if dtype == torch.bfloat16:  # bf16 arithmetic is what eager PyTorch would do; round its result
            in_dtype = (in_dtype[0], in_dtype[1].to(dtype))
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
        assert grad.dtype == dtype and grad.shape == x.shape
        if dtype == torch.float64:
            # the reference is the same float64 computation: bound by sequential summation over a
            # 2048-element chunk instead, 2048 eps
            torch.testing.assert_close(loss, ref_loss, rtol=2048 * 2.2e-16, atol=0)
            torch.testing.assert_close(grad, ref_grad, rtol=2048 * 2.2e-16, atol=0)
            continue
        assert_close_to_reference(loss.reshape(1), ref_loss.reshape(1), in_dtype[0].reshape(1).to(loss.dtype),
                                  f"loss {shape}")
        assert_close_to_reference(grad, ref_grad, in_dtype[1].to(dtype), f"grad {shape}")


@pytest.mark.parametrize("device", devices())
def test_gradient_is_dmd2s_and_only_x_gets_one(device):
    gen = torch.Generator().manual_seed(1)
    x, real, uncond, fake = inputs((2, 4, 8, 8), torch.float32, device, gen)
    x.requires_grad_(True)
    real.requires_grad_(True)
    loss = fewstep.losses.dmd(x, real, fake, x0_real_uncond=uncond, guidance_scale=3.0)
    (3 * loss).backward()
    # DMD2's official chain: grad under no_grad, then 0.5 * mse(x, sg(x - grad))
    x2 = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        guided = uncond + 3.0 * (real - uncond)
        p_real, p_fake = x2 - guided, x2 - fake
        g = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    official = 0.5 * torch.nn.functional.mse_loss(x2, (x2 - g).detach())
    (3 * official).backward()
    torch.testing.assert_close(loss, official, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-9)
    assert real.grad is None  # the scores' predictions are constants of the loss


@pytest.mark.parametrize("device", devices())
def test_zero_norm_sample_gives_zero_gradient_and_a_finite_loss(device):
    gen = torch.Generator().manual_seed(2)
    x, real, _, fake = inputs((3, 2, 5, 5), torch.float32, device, gen)
    real[1] = x[1]  # p_real = 0 for sample 1: its normalized gradient is 0/0 or x/0
    x.requires_grad_(True)
    loss = fewstep.losses.dmd(x, real, fake)
    loss.backward()
    grad = x.grad
    assert torch.isfinite(loss)
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[0]) > 0


@pytest.mark.parametrize("device", devices())
def test_deterministic(device):
    gen = torch.Generator().manual_seed(3)
    x, real, uncond, fake = inputs((4, 4, 64, 64), torch.float32, device, gen)
    a = torch.ops.fewstep.dmd_loss(x, real, uncond, 2.0, fake)
    b = torch.ops.fewstep.dmd_loss(x, real, uncond, 2.0, fake)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    one = torch.ones_like(a[0])
    ga = torch.ops.fewstep.dmd_loss_backward(one, real, uncond, 2.0, fake, a[1])
    gb = torch.ops.fewstep.dmd_loss_backward(one, real, uncond, 2.0, fake, b[1])
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("device", devices())
def test_opcheck_and_compile(device):
    gen = torch.Generator().manual_seed(4)
    x, real, uncond, fake = inputs((2, 3, 5, 7), torch.float32, device, gen)
    torch.library.opcheck(torch.ops.fewstep.dmd_loss.default, (x.requires_grad_(True), real, uncond, 2.0, fake))
    torch.library.opcheck(torch.ops.fewstep.dmd_loss.default, (x, real, None, 1.0, fake))
    _, norm = torch.ops.fewstep.dmd_loss(x, real, uncond, 2.0, fake)
    torch.library.opcheck(torch.ops.fewstep.dmd_loss_backward.default,
                          (torch.tensor(0.7, device=device), real, uncond, 2.0, fake, norm))

    def step(x, real, fake, uncond):
        return fewstep.losses.dmd(x, real, fake, x0_real_uncond=uncond, guidance_scale=2.0) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xe = x.detach().clone().requires_grad_(True)
    step(xe, real, fake, uncond).backward()
    xc = x.detach().clone().requires_grad_(True)
    compiled(xc, real, fake, uncond).backward()
    assert torch.equal(xe.grad, xc.grad)


@pytest.mark.parametrize("cfg", [False, True])
def test_backward_op_gradcheck_float64(cfg):
    gen = torch.Generator().manual_seed(8)
    x, real, uncond, fake = inputs((2, 3, 4, 5), torch.float64, "cpu", gen)
    _, norm = torch.ops.fewstep.dmd_loss(x, real, uncond if cfg else None, 2.5, fake)
    grad_loss = torch.tensor(0.8, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (grad_loss, real, uncond, fake, norm)]

    def f(grad_loss, real, uncond, fake, norm):
        return torch.ops.fewstep.dmd_loss_backward(grad_loss, real, uncond if cfg else None, 2.5, fake, norm)

    assert torch.autograd.gradcheck(f, args)


def test_reference_backend_agrees():
    gen = torch.Generator().manual_seed(5)
    x, real, uncond, fake = inputs((2, 3, 5, 7), torch.float32, "cpu", gen)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la = fewstep.losses.dmd(xa, real, fake, x0_real_uncond=uncond, guidance_scale=2.0)
    with fewstep.backend("reference"):
        lb = fewstep.losses.dmd(xb, real, fake, x0_real_uncond=uncond, guidance_scale=2.0)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("make,error,message", [
    (lambda x, r, u, f: (x, r[:1], None, 1.0, f), ValueError,
     "real: expected shape [2, 3, 5, 7] (the shape of x), got [1, 3, 5, 7]"),
    (lambda x, r, u, f: (x, r, u.double(), 1.0, f), TypeError,
     "real_uncond: expected dtype torch.float32 (the dtype of x), got torch.float64"),
    (lambda x, r, u, f: (x, r, None, float("inf"), f), ValueError, "guidance_scale: expected a finite number, got inf"),
    (lambda x, r, u, f: (x.flatten(), r.flatten(), None, 1.0, f.flatten()), ValueError,
     "x: expected a batch of samples [B, ...] with at least 2 dims, got shape [210]"),
    (lambda x, r, u, f: (x.long(), r, None, 1.0, f), TypeError, "x: expected dtype in"),
])
def test_bad_input(make, error, message):
    gen = torch.Generator().manual_seed(6)
    args = make(*inputs((2, 3, 5, 7), torch.float32, "cpu", gen))
    with pytest.raises(error, match=re.escape(message)):
        torch.ops.fewstep.dmd_loss(*args)


def test_backward_bad_input():
    gen = torch.Generator().manual_seed(7)
    x, real, uncond, fake = inputs((2, 3, 5, 7), torch.float32, "cpu", gen)
    _, norm = torch.ops.fewstep.dmd_loss(x, real, None, 1.0, fake)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match=re.escape("norm: expected the forward's torch.float64 norms of shape [2]")):
        torch.ops.fewstep.dmd_loss_backward(one, real, None, 1.0, fake, norm[:1])
    with pytest.raises(TypeError, match=re.escape("grad_loss: expected dtype torch.float32, got torch.float64")):
        torch.ops.fewstep.dmd_loss_backward(one.double(), real, None, 1.0, fake, norm)
    with pytest.raises(ValueError, match=re.escape("grad_loss: expected a 0-dim tensor on cpu, got shape [1]")):
        torch.ops.fewstep.dmd_loss_backward(one.reshape(1), real, None, 1.0, fake, norm)
