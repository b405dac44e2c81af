"""fewstep.Denoiser: exact conversions between x0, eps, v and flow on VP and flow schedules."""
from __future__ import annotations

import re
import types

import pytest
import torch

import fewstep
from fewstep import Denoiser, FlowSchedule, VPSchedule

SCHEDULES = {
    "vp-sd": lambda: VPSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "vp-cosine": lambda: VPSchedule(beta_schedule="squaredcos_cap_v2"),
    "flow-shift3": lambda: FlowSchedule(shift=3.0),
}


def truth(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen,
                                                                                 dtype=torch.float64)


def oracle(prediction, x0, eps, alpha, sigma):
    """A model that predicts its target exactly."""
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0}[prediction]


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_conversions_recover_every_parametrization(schedule_name, prediction):
    schedule = SCHEDULES[schedule_name]()
    if prediction == "v" and not schedule.variance_preserving:
        pytest.skip("v is defined on VP schedules only (tested as an error below)")
    gen = torch.Generator().manual_seed(0)
    x0, eps = truth((3, 4, 5, 7), gen)
    t = torch.tensor([10, 500, 990])
    alpha, sigma = schedule.alpha_sigma(t, x0)

    def model(x_t, t_in, scale=1.0):
        assert torch.equal(t_in, t)
        return oracle(prediction, x0, eps, alpha, sigma) * scale

    den = Denoiser(model, prediction=prediction, schedule=schedule)
    x_t = den.add_noise(x0, eps, t)
    pred = den(x_t, t, scale=1.0)
    torch.testing.assert_close(pred.x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred.eps, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred.flow, eps - x0, rtol=1e-9, atol=1e-9)
    if schedule.variance_preserving:
        torch.testing.assert_close(pred.v, alpha * eps - sigma * x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha))
    else:
        torch.testing.assert_close(alpha + sigma, torch.ones_like(alpha))


def test_vp_schedule_matches_diffusers_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = VPSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x = torch.zeros(5, 1, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 998, 999])
    alpha, sigma = ours.alpha_sigma(t, x)
    abar = sched.alphas_cumprod[t].double()
    torch.testing.assert_close(alpha.flatten(), abar.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sigma.flatten(), (1 - abar).sqrt(), rtol=1e-6, atol=0)


def test_flow_schedule_matches_sd3_shift():
    x = torch.zeros(3, 2)
    alpha, sigma = FlowSchedule(shift=3.0).alpha_sigma(torch.tensor([250.0, 500.0, 1000.0]), x)
    s = torch.tensor([0.25, 0.5, 1.0])
    torch.testing.assert_close(sigma.flatten(), 3 * s / (1 + 2 * s))


def test_diffusers_style_outputs_and_low_precision_inputs():
    gen = torch.Generator().manual_seed(1)
    x0, eps = truth((2, 3, 4, 4), gen)
    den_obj = Denoiser(lambda x, t: types.SimpleNamespace(sample=torch.zeros_like(x)), "eps")
    den_tuple = Denoiser(lambda x, t: (torch.zeros_like(x),), "eps")
    x_t = x0.to(torch.bfloat16)
    for den in (den_obj, den_tuple):
        pred = den(x_t, 400)
        assert pred.x0.dtype == torch.float32  # bf16 inputs convert in fp32
        alpha, _ = den.schedule.alpha_sigma(torch.tensor(400), x_t)
        torch.testing.assert_close(pred.x0, x_t.float() / alpha)


def test_bad_input():
    with pytest.raises(ValueError, match=re.escape("prediction: expected one of ['eps', 'x0', 'v', 'flow'], got 'epsilon'")):
        Denoiser(lambda x, t: x, "epsilon")
    with pytest.raises(ValueError, match=re.escape("prediction: 'v' needs a variance-preserving schedule")):
        Denoiser(lambda x, t: x, "v", FlowSchedule())
    with pytest.raises(TypeError, match="model: expected a callable"):
        Denoiser(3, "eps")
    den = Denoiser(lambda x, t: x[:, :1], "eps")
    with pytest.raises(ValueError, match=re.escape("model: expected an output of x_t's shape [2, 3, 4] "
                                                   "(eps prediction), got [2, 1, 4]")):
        den(torch.randn(2, 3, 4), 10)
    good = Denoiser(lambda x, t: x, "x0")
    with pytest.raises(ValueError, match=re.escape("t: expected a scalar or one timestep per sample (2), got shape [3]")):
        good(torch.randn(2, 3, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="v: defined for variance-preserving schedules only"):
        Denoiser(lambda x, t: x, "flow")(torch.randn(2, 3), 100).v
    assert fewstep.Denoiser is Denoiser
