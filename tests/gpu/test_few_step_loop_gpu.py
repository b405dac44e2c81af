"""A whole few-step loop on the GPU: no host-device sync, and capturable as one CUDA graph."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fewstep
from fewstep import samplers
from helpers import HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FACTORIES = {
    "ddim": lambda: samplers.DDIMSampler(**SD, timestep_spacing="trailing", eta=0.5),
    "lcm": lambda: samplers.LCMSampler(**SD),
    "tcd": lambda: samplers.TCDSampler(**SD, eta=0.3),
    "dpm++2m": lambda: samplers.DPMSolverMultistepSampler(**SD),
    "dmd2": lambda: samplers.DMD2Sampler(**SD),
    "euler": lambda: samplers.EulerSampler(**SD, s_churn=0.5),
}


class SmallDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 4, 3, padding=1))

    def forward(self, x, t):
        return self.net(x) * (1 + t / 1000)  # t: a CPU scalar, read on the host: no device traffic


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_loop_is_sync_free_and_replays_as_cuda_graph(name, backend):
    torch.manual_seed(0)
    model = SmallDenoiser().cuda()
    sampler = FACTORIES[name]()
    sampler.set_timesteps(4)
    x_T = torch.randn(2, 4, 32, 32, device="cuda")
    noises = [torch.randn_like(x_T) for _ in range(4)]

    def loop(x):
        x = x * sampler.init_noise_sigma
        for i in range(sampler.num_steps):
            out = model(sampler.scale_model_input(x, i), sampler.timesteps[i])
            x = sampler.step(out, i, x, noises[i])
        return x

    with fewstep.backend(backend), torch.no_grad():
        loop(x_T)  # warm-up: kernel compilation and cuDNN set-up may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager = loop(x_T)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        static_x = x_T.clone()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop(static_x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            static_out = loop(static_x)
        graph.replay()
        torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)
        new_x = torch.randn_like(x_T)
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_out, loop(new_x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(static_out, eager)


def test_guided_loop_with_rescale_is_sync_free():
    torch.manual_seed(1)
    model = SmallDenoiser().cuda()
    sampler = samplers.DDIMSampler(**SD, timestep_spacing="trailing")
    x_T = torch.randn(1, 4, 32, 32, device="cuda")

    def denoiser(x, t):
        return model(x, t), model(x * 0.9, t)

    with torch.no_grad():
        samplers.sample(denoiser, x_T, sampler, num_steps=4, guidance_scale=5.0, guidance_rescale=0.7)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = samplers.sample(denoiser, x_T, sampler, num_steps=4, guidance_scale=5.0, guidance_rescale=0.7)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
