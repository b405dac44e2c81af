"""CPU timings (pytest-benchmark) of the fused sampler step against the same math in eager PyTorch.
Run: ``make bench-cpu``."""
import pytest
import torch

import fewstep
from fewstep.ops import StepCoeffs, sampler_step

A, B, AP, BP, W, CS, CO = 0.2765, 0.9610, 0.5000, 0.8660, 7.5, 0.0025, 0.9987
LCM = StepCoeffs(a_x=1 / A, a_m=-B / A, o_x=AP * CS, o_0=AP * CO, o_z=BP, d_x=CS, d_0=CO)
SHAPE = (2, 4, 128, 128)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=gen) for _ in range(4)]


def eager_lcm(x, c, u, z):
    m = u + W * (c - u)
    x0 = (x - B * m) / A
    denoised = CS * x + CO * x0
    return AP * denoised + BP * z, denoised


@pytest.mark.benchmark(group="lcm+cfg step 2x4x128x128 fp32")
def test_eager(benchmark, inputs):
    benchmark(eager_lcm, *inputs)


@pytest.mark.benchmark(group="lcm+cfg step 2x4x128x128 fp32")
@pytest.mark.parametrize("backend", ["cpu"])
def test_fewstep(benchmark, inputs, backend):
    x, c, u, z = inputs

    def step():
        with fewstep.backend(backend):
            return sampler_step(x, c, LCM, uncond=u, guidance_scale=W, noise=z, return_x0=True)

    out, den = benchmark(step)
    ref_out, ref_den = eager_lcm(x, c, u, z)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
