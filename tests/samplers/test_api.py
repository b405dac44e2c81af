"""Sampler interface: bad input, unsupported configs, noise handling, multistep state, the loop."""
import math
import subprocess
import sys

import pytest
import torch

from fewstep import samplers
from fewstep.samplers import (ConsistencySampler, DDIMSampler, DDPMSampler, DMD2Sampler, DPMSolverMultistepSampler,
                              EulerSampler, FlowMatchEulerSampler, LCMSampler, TCDSampler)

ALL_SAMPLERS = [DDIMSampler, DDPMSampler, LCMSampler, TCDSampler, EulerSampler, FlowMatchEulerSampler,
                DPMSolverMultistepSampler, ConsistencySampler, DMD2Sampler]


def _fake_scheduler(class_name, **config):
    """A duck-typed diffusers scheduler: only the class name and ``config`` are read."""
    return type(class_name, (), {"config": dict(config, _class_name=class_name, _diffusers_version="0")})()


def _ready(cls, steps=4):
    sampler = cls()
    sampler.set_timesteps(steps)
    return sampler


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_step_before_set_timesteps(cls):
    sampler = cls()
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(x, 0, x)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.timesteps


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
@pytest.mark.parametrize("index", [4, -1])
def test_step_index_out_of_range(cls, index):
    sampler = _ready(cls)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(IndexError, match=r"i: expected a step index in \[0, 4\)"):
        sampler.step(x, index, x)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        sampler.scale_model_input(x, index)


@pytest.mark.parametrize("cls", ALL_SAMPLERS)
def test_one_sampler_step_is_finite_and_timesteps_are_cpu(cls):
    sampler = _ready(cls)
    assert sampler.timesteps.device.type == "cpu" and sampler.timesteps.dim() == 1
    x = torch.randn(2, 3, 5, 7) * sampler.init_noise_sigma
    out = torch.randn(2, 3, 5, 7)
    for i in range(sampler.num_steps):
        x = sampler.step(out, i, x, generator=torch.Generator().manual_seed(i))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("make,match,error", [
    (lambda: DDIMSampler(eta=-0.1), "eta", ValueError),
    (lambda: DDIMSampler(prediction_type="flow"), "prediction_type", ValueError),
    (lambda: DDIMSampler(beta_schedule="cosine"), "beta_schedule", ValueError),
    (lambda: DDIMSampler(beta_schedule="sigmoid"), "beta_schedule", NotImplementedError),
    (lambda: DDIMSampler(timestep_spacing="uniform"), "timestep_spacing", ValueError),
    (lambda: DDIMSampler(clip_sample_range=0.0), "clip_sample_range", ValueError),
    (lambda: DDIMSampler(trained_betas=[0.1, 0.2]), "trained_betas", ValueError),
    (lambda: DDPMSampler(variance_type="learned_range"), "variance_type", NotImplementedError),
    (lambda: TCDSampler(eta=1.5), "eta", ValueError),
    (lambda: EulerSampler(s_churn=float("nan")), "s_churn", ValueError),
    (lambda: DPMSolverMultistepSampler(solver_order=3), "solver_order", NotImplementedError),
    (lambda: DPMSolverMultistepSampler(algorithm_type="dpmsolver"), "algorithm_type", NotImplementedError),
    (lambda: DPMSolverMultistepSampler(solver_type="bh2"), "solver_type", ValueError),
    (lambda: FlowMatchEulerSampler(shift=0.0), "shift", ValueError),
    (lambda: DMD2Sampler(timesteps=[249, 499]), "timesteps", ValueError),
    (lambda: DMD2Sampler(timesteps=[1000, 500]), "timesteps", ValueError),
])
def test_constructor_validation(make, match, error):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("cls,steps,match", [
    (DDIMSampler, 1001, "num_steps"), (LCMSampler, 51, "original_inference_steps"), (DMD2Sampler, 3, "num_steps"),
    (ConsistencySampler, 41, "num_steps"), (EulerSampler, 0, "num_steps")])
def test_set_timesteps_validation(cls, steps, match):
    with pytest.raises(ValueError, match=match):
        cls().set_timesteps(steps)


@pytest.mark.parametrize("class_name,config,match", [
    ("DDIMScheduler", dict(thresholding=True), "thresholding"),
    ("DPMSolverMultistepScheduler", dict(thresholding=True), "thresholding"),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), "interpolation_type"),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), "use_lu_lambdas"),
    ("DPMSolverMultistepScheduler", dict(lambda_min_clipped=-5.1), "lambda_min_clipped"),
    ("DDIMScheduler", dict(some_future_option=1), "some_future_option"),
    ("UniPCMultistepScheduler", {}, "UniPCMultistepScheduler"),
])
def test_from_diffusers_rejects_unsupported(class_name, config, match):
    with pytest.raises(NotImplementedError, match=match):
        samplers.from_diffusers(_fake_scheduler(class_name, **config))


def test_from_diffusers_step_kwargs():
    sampler = samplers.from_diffusers(_fake_scheduler("TCDScheduler", clip_sample=True), eta=0.6)
    assert isinstance(sampler, TCDSampler) and sampler.eta == 0.6
    with pytest.raises(ValueError, match="s_churn"):
        samplers.from_diffusers(_fake_scheduler("FlowMatchEulerDiscreteScheduler"), s_churn=1.0)


def test_explicit_noise_equals_generator_noise():
    sampler = DDIMSampler(eta=1.0)
    sampler.set_timesteps(4)
    x, out = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    by_generator = sampler.step(out, 1, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampler.step(out, 1, x, noise), by_generator)
    assert not torch.equal(sampler.step(out, 1, x, torch.zeros_like(x)), by_generator)


def test_dpm_solver_needs_steps_in_order():
    sampler = _ready(DPMSolverMultistepSampler, 6)
    x, out = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    x1 = sampler.step(out, 0, x)
    with pytest.raises(RuntimeError, match="x0 of step 1"):
        sampler.step(out, 2, x1)
    sampler.step(out, 1, x1)
    sampler.set_timesteps(6)  # resets the multistep state
    with pytest.raises(RuntimeError, match="x0 of step 0"):
        sampler.step(out, 1, x1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_dmd2_renoises_x0(prediction_type):
    sampler = DMD2Sampler(prediction_type=prediction_type)
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]
    abar = samplers.schedules.alphas_cumprod(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for i, t in enumerate(sampler.timesteps.tolist()):
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        x0 = {"epsilon": (x - s * out) / a, "sample": out, "v_prediction": a * x - s * out}[prediction_type]
        if i == 3:
            expected = x0
        else:
            a_next = abar[sampler.timesteps[i + 1]]
            expected = a_next.sqrt() * x0 + (1 - a_next).sqrt() * z
        got, denoised = sampler.step(out, i, x, z, return_denoised=True)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(denoised, x0, rtol=1e-12, atol=1e-12)


def test_sample_loop_matches_manual_loop_and_passes_cpu_timesteps():
    seen = []

    def denoiser(model_input, t):
        seen.append(t)
        return 0.3 * model_input + 0.01 * float(t), 0.2 * model_input

    sampler = EulerSampler(s_churn=1.0)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    result = samplers.sample(denoiser, x_T, sampler, num_steps=5, guidance_scale=4.0, guidance_rescale=0.5,
                             generator=torch.Generator().manual_seed(1))
    assert [float(t) for t in seen] == sampler.timesteps.tolist()
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 and t.device.type == "cpu" for t in seen)

    g = torch.Generator().manual_seed(1)
    x = x_T * sampler.init_noise_sigma
    for i in range(5):
        cond, uncond = denoiser(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x = sampler.step(cond, i, x, uncond=uncond, guidance_scale=4.0, guidance_rescale=0.5, generator=g)
    assert torch.equal(result, x)
    with pytest.raises(ValueError, match="guidance_rescale"):
        samplers.sample(lambda x, t: x, x_T, sampler, guidance_rescale=0.5)


def test_lcm_default_timesteps():
    sampler = _ready(LCMSampler, 4)
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]
    assert math.isclose(sampler.init_noise_sigma, 1.0)


def test_imports_without_diffusers():
    code = "import sys; sys.modules['diffusers'] = None; import fewstep.samplers; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
