"""DMD2 and BOOT on the GPU: losses without host syncs (1-step and backward-simulated 4-step DMD2
with a GAN head, BOOT with CFG), exact values against hand computations with the device's random
draws, and bf16 autocast."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import HAS_CUDA, count_host_syncs
from torch import nn

import fewstep
from fewstep.distill import BOOT, DMD2
from fewstep.toy import GaussianMixtureDenoiser

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")

SCHEDULE = fewstep.VPSchedule()


class ConvNet(nn.Module):
    """A small image model with a timestep input, a class condition and a named feature layer."""

    def __init__(self, channels: int = 4, width: int = 32):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.time = nn.Linear(2, width)

    def forward(self, x, t, label=None):
        phase = math.pi * t.float().reshape(-1, 1).expand(x.shape[0], 1) / 1000
        h = self.inp(x) + self.time(torch.cat([phase.sin(), phase.cos()], 1))[:, :, None, None].to(x.dtype)
        if label is not None:
            h = h + label.to(h.dtype).reshape(-1, 1, 1, 1)
        return self.out(self.body(h))


class Head(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))

    def forward(self, h):
        return self.net(h)


def _syncs(fn) -> int:
    fn()  # lazy initialisations (cuBLAS handles, device tables) stay outside the count
    return count_host_syncs(fn)


def _methods():
    torch.manual_seed(0)
    teacher = fewstep.Denoiser(ConvNet().cuda(), "eps", SCHEDULE)
    dmd1 = DMD2(teacher, guidance_scale=2.0, null_cond={"label": torch.zeros(8, device="cuda")},
                gan_head=Head().cuda(), gan_feature_layer="body")
    dmd4 = DMD2(teacher, num_steps=4, guidance_scale=2.0, null_cond={"label": torch.zeros(8, device="cuda")})
    boot = BOOT(teacher, fewstep.Denoiser(ConvNet().cuda(), "x0", SCHEDULE), guidance_scale=2.0,
                null_cond={"label": torch.zeros(8, device="cuda")}).cuda()
    batch = {"x0": torch.randn(8, 4, 16, 16, device="cuda"), "cond": {"label": torch.ones(8, device="cuda")}}
    return (dmd1, dmd4, boot), batch


def test_losses_make_no_host_sync():
    methods, batch = _methods()
    for method in methods:
        def step():
            for phase in method.phases:
                loss, logs = method.loss(phase, batch, 0)
                loss.backward()
        assert _syncs(step) == 0, type(method).__name__


def test_bf16_autocast_gives_finite_losses_and_grads():
    methods, batch = _methods()
    for method in methods:
        for phase in method.phases:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, logs = method.loss(phase, batch, 0)
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters_of(phase))


def test_dmd2_generator_gradient_on_device_matches_hand_computed():
    abar = fewstep.samplers.schedules.alphas_cumprod()
    toy = GaussianMixtureDenoiser(abar.float(), shape=(3,), num_modes=4, std=0.15, seed=1).cuda()
    teacher = fewstep.Denoiser(toy, "eps", SCHEDULE)

    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, device="cuda"))

        def forward(self, x, t):
            return x + self.b

    class Scale(nn.Module):
        def forward(self, x, t):
            return 0.7 * x

    m = DMD2(teacher, fewstep.Denoiser(Shift(), "x0", SCHEDULE), fewstep.Denoiser(Scale(), "x0", SCHEDULE))
    noise = torch.randn(5, 3, dtype=torch.float64, device="cuda")
    torch.manual_seed(11)
    m.generator_loss({"noise": noise})[0].backward()
    torch.manual_seed(11)
    x = noise + m.generator.model.b.detach()
    t = torch.randint(m.t_min, m.t_max + 1, (5,), device="cuda")
    alpha, sigma = SCHEDULE.alpha_sigma(t, x)
    x_t = alpha * x + sigma * torch.randn_like(x)
    real = (x_t - sigma * toy(x_t, t)) / alpha
    grad_x = (0.7 * x_t - real) / (x - real).abs().mean(1, keepdim=True) / x.numel()
    torch.testing.assert_close(m.generator.model.b.grad, grad_x.sum(0), rtol=1e-9, atol=1e-12)


def test_boot_fixed_point_on_device():
    abar = fewstep.samplers.schedules.alphas_cumprod()
    toy = GaussianMixtureDenoiser(abar.float(), shape=(2,), num_modes=4, std=0.15, seed=1).cuda()
    teacher = fewstep.Denoiser(toy, "eps", SCHEDULE)
    eps = torch.randn(64, 2, dtype=torch.float64, device="cuda")
    m = BOOT(teacher, fewstep.Denoiser(nn.Identity(), "x0", SCHEDULE), num_intervals=6).cuda()
    grid = m.timesteps

    def at(i):
        return SCHEDULE.alpha_sigma(torch.full((64,), grid[i], device="cuda"), eps)

    ys = [teacher(eps, torch.full((64,), grid[0], device="cuda")).x0]  # the boundary, then x-space DDIM
    alpha, sigma = at(0)
    x = alpha * ys[0] + sigma * eps
    for i in range(1, len(grid)):
        pred = teacher(x, torch.full((64,), grid[i - 1], device="cuda"))
        alpha, sigma = at(i)
        x = alpha * pred.x0 + sigma * pred.eps
        ys.append((x - sigma * eps) / alpha)
    table = torch.stack(ys)
    grid_t = torch.tensor(grid, device="cuda")

    class Trajectory(nn.Module):
        def forward(self, x, t):
            return table[(grid_t[None, :] == t[:, None]).int().argmax(1), torch.arange(64, device="cuda")]

    m.student = fewstep.Denoiser(Trajectory(), "x0", SCHEDULE)
    assert float(m.loss("student", {"noise": eps}, 0)[0]) < 1e-24
