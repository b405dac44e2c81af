"""fewstep samplers reproduce diffusers schedulers: timesteps, and whole step trajectories within
1e-5 relative error in float32 with the same noise (identically seeded generators: both sides
draw with torch.randn(shape, generator=g, dtype=float32) in the same order, so any difference in
where noise is drawn also shows up as a mismatch)."""
import itertools
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fewstep import samplers  # noqa: E402

BETAS = {"linear": dict(beta_schedule="linear"),
         "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
         "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2")}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
SHAPES = ((2, 3, 5, 7), (1, 4, 6, 6))
TOLERANCE = 1e-5


def _cases():
    cases = []
    for k, (beta, pred, spacing) in enumerate(itertools.product(BETAS, PREDICTIONS, SPACINGS)):
        # eta = 1 with the cosine schedule is left out: diffusers' float32 sqrt(1 - abar_prev - std^2)
        # cancels there (84% error in that coefficient at t=999); fewstep computes it in float64.
        eta = (0.0, 0.5, 1.0)[k % 3] if beta != "squaredcos_cap_v2" else (0.0, 0.5)[k % 2]
        config = dict(**BETAS[beta], prediction_type=pred, timestep_spacing=spacing, steps_offset=k % 2,
                      set_alpha_to_one=bool(k % 2), clip_sample=k % 4 != 0)
        cases.append(("DDIMScheduler", config, 4 + k % 7, dict(eta=eta, use_clipped_model_output=k % 5 == 0)))
    for k, (beta, pred, spacing) in enumerate(itertools.product(BETAS, PREDICTIONS, SPACINGS)):
        config = dict(**BETAS[beta], prediction_type=pred, timestep_spacing=spacing, steps_offset=k % 2,
                      variance_type=("fixed_small", "fixed_large")[k % 2], clip_sample=k % 3 != 0)
        cases.append(("DDPMScheduler", config, 3 + k % 6, {}))
    for k, (beta, pred) in enumerate(itertools.product(BETAS, PREDICTIONS)):
        config = dict(**BETAS[beta], prediction_type=pred, original_inference_steps=(50, 25)[k % 2],
                      clip_sample=k % 3 == 0)
        cases.append(("LCMScheduler", config, 1 + k % 8, {}))
        cases.append(("TCDScheduler", dict(config, clip_sample=False), 2 + k % 6, dict(eta=(0.3, 0.0, 0.9)[k % 3])))
    for k, (beta, pred, spacing, karras) in enumerate(itertools.product(BETAS, PREDICTIONS, SPACINGS, (False, True))):
        if beta == "squaredcos_cap_v2" and pred != "epsilon":
            # The cosine schedule's sigma_max ~ 2e4: diffusers' float32 x + (x - x0) / sigma * dt
            # cancels to ~1e-4 relative error there (fewstep's coefficients are float64).
            continue
        config = dict(**BETAS[beta], prediction_type=pred, timestep_spacing=spacing, steps_offset=k % 2,
                      use_karras_sigmas=karras, final_sigmas_type=("zero", "sigma_min")[k % 2])
        churn = dict(s_churn=0.5 + k % 3, s_tmin=0.2, s_tmax=(math.inf, 5.0)[k % 2], s_noise=1.003) if k % 3 else {}
        cases.append(("EulerDiscreteScheduler", config, 3 + k % 9, churn))
    for k, (shift, karras, stochastic, terminal) in enumerate(
            itertools.product((1.0, 3.0), (False, True), (False, True), (None, 0.05))):
        config = dict(shift=shift, use_karras_sigmas=karras, stochastic_sampling=stochastic, shift_terminal=terminal)
        cases.append(("FlowMatchEulerDiscreteScheduler", config, 2 + k % 7, {}))
    for k, (algorithm, order, solver, pred) in enumerate(
            itertools.product(("dpmsolver++", "sde-dpmsolver++"), (1, 2), ("midpoint", "heun"), PREDICTIONS)):
        beta = list(BETAS)[k % 3]
        # diffusers' Karras timesteps repeat on the cosine schedule, which breaks its own step indexing.
        karras = k % 2 == 1 and beta != "squaredcos_cap_v2"
        config = dict(**BETAS[beta], algorithm_type=algorithm, solver_order=order, solver_type=solver,
                      prediction_type=pred, use_karras_sigmas=karras, timestep_spacing=SPACINGS[k % 3],
                      steps_offset=k % 2, final_sigmas_type=("zero", "sigma_min")[(k // 2) % 2],
                      lower_order_final=k % 5 != 0, euler_at_final=k % 7 == 0)
        cases.append(("DPMSolverMultistepScheduler", config, (3, 8, 16, 20)[k % 4], {}))
    for k, steps in enumerate((1, 2, 3, 5)):
        config = dict(clip_denoised=k % 2 == 0, s_noise=(1.0, 0.9)[k % 2])
        cases.append(("CMStochasticIterativeScheduler", config, steps, {}))
    return cases


CASES = _cases()


def _ids():
    return [f"{name.removesuffix('Scheduler')}-{k}" for k, (name, *_rest) in enumerate(CASES)]


def _linear_denoiser(channels: int, shape):
    """A fixed random map from (x, t) to a model output, linear in x so the trajectory depends on x."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(channels, channels, generator=g) / channels ** 0.5
    bias = torch.randn(shape, generator=g)

    def denoise(x, t):
        return 0.5 * torch.einsum("bc...,dc->bd...", x, mix) + 0.3 * math.cos(float(t) / 300.0) * bias

    return denoise


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", range(len(CASES)), ids=_ids())
def test_trajectory_matches_diffusers(case):
    name, config, num_steps, step_kwargs = CASES[case]
    shape = SHAPES[case % len(SHAPES)]
    scheduler = getattr(diffusers, name)(**config)
    sampler = samplers.from_diffusers(scheduler, **step_kwargs)
    scheduler.set_timesteps(num_steps)
    sampler.set_timesteps(num_steps)

    assert sampler.timesteps.dtype == scheduler.timesteps.dtype
    if name == "EulerDiscreteScheduler" and config["use_karras_sigmas"]:
        # Fractional timesteps interpolated in diffusers' numpy float32 log table (not correctly
        # rounded; fewstep's is): a few float32 ulps apart, < 1e-4 timestep units.
        torch.testing.assert_close(sampler.timesteps, scheduler.timesteps, rtol=0, atol=1e-4)
    else:
        assert torch.equal(sampler.timesteps, scheduler.timesteps)
    init_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    assert sampler.init_noise_sigma == pytest.approx(init_sigma, rel=1e-6)

    denoise = _linear_denoiser(shape[1], shape)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    x_ref, x = start * init_sigma, start * sampler.init_noise_sigma
    g_ref, g = torch.Generator().manual_seed(case), torch.Generator().manual_seed(case)
    for i, t in enumerate(scheduler.timesteps):
        model_in_ref = scheduler.scale_model_input(x_ref, t) if hasattr(scheduler, "scale_model_input") else x_ref
        model_in = sampler.scale_model_input(x, i)
        assert _rel_err(model_in, model_in_ref) <= TOLERANCE
        out_ref = scheduler.step(denoise(model_in_ref, t), t, x_ref, generator=g_ref, **step_kwargs)
        x, denoised = sampler.step(denoise(model_in, sampler.timesteps[i]), i, x, generator=g, return_denoised=True)
        x_ref = out_ref.prev_sample
        assert torch.isfinite(x).all()
        err = _rel_err(x, x_ref)
        assert err <= TOLERANCE, f"step {i} (t={t}): relative error {err:.3e}"
        if name == "LCMScheduler":
            assert _rel_err(denoised, out_ref.denoised) <= TOLERANCE
        elif name in ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"):
            assert _rel_err(denoised, out_ref.pred_original_sample) <= TOLERANCE
    # Same number of draws on both sides: the generators end in the same state.
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=g_ref))


def test_lcm_last_step_returns_denoised():
    scheduler = diffusers.LCMScheduler()
    sampler = samplers.from_diffusers(scheduler)
    sampler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    out = torch.randn(1, 4, 8, 8)
    x_next, denoised = sampler.step(out, 3, x, return_denoised=True)
    assert torch.equal(x_next, denoised)


def _rescale_noise_cfg(guided, cond, guidance_rescale):
    """diffusers pipelines' ``rescale_noise_cfg`` (Lin et al. 2023, Sec. 3.4)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def test_cfg_and_rescale_fused_like_diffusers_pipeline():
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        timestep_spacing="trailing", prediction_type="v_prediction")
    sampler = samplers.from_diffusers(scheduler)
    scheduler.set_timesteps(5)
    sampler.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g)
    cond, uncond = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g)
    w, phi = 7.5, 0.7
    guided = uncond + w * (cond - uncond)
    guided = _rescale_noise_cfg(guided, cond, phi)
    expected = scheduler.step(guided, scheduler.timesteps[1], x).prev_sample
    got = sampler.step(cond, 1, x, uncond=uncond, guidance_scale=w, guidance_rescale=phi)
    assert _rel_err(got, expected) <= TOLERANCE
