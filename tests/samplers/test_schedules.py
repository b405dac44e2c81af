"""Schedule tables and grids equal diffusers' (and numpy's) values exactly."""
import math

import pytest
import torch

from fewstep.samplers import schedules

np = pytest.importorskip("numpy")


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", [
    ("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_equal_diffusers(beta_schedule, beta_start, beta_end, zero_snr):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                                  rescale_betas_zero_snr=zero_snr)
    kwargs = dict(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
                  rescale_betas_zero_snr=zero_snr)
    assert torch.equal(schedules.betas(**kwargs), ref.betas.double())
    abar = schedules.alphas_cumprod(**kwargs)
    assert abar.dtype == torch.float64
    assert torch.equal(abar, ref.alphas_cumprod.double())
    if zero_snr:
        assert abar[-1] == 0.0


def test_trained_betas_and_vp_sigmas():
    trained = [0.001 * (k + 1) for k in range(10)]
    abar = schedules.alphas_cumprod(10, trained_betas=trained)
    expected = torch.cumprod(1 - torch.tensor(trained, dtype=torch.float32), 0).double()
    assert torch.equal(abar, expected)
    sigmas = schedules.vp_sigmas(abar)
    assert torch.allclose(sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("start,stop,num,endpoint", [(0, 999, 7, True), (999.0, 0.3, 13, True), (0, 50, 4, False),
                                                     (0, 1, 1, True), (3.7, 3.7, 3, True)])
def test_np_linspace(start, stop, num, endpoint):
    assert schedules.np_linspace(start, stop, num, endpoint) == np.linspace(start, stop, num, endpoint=endpoint).tolist()


@pytest.mark.parametrize("n", [1, 3, 7, 9, 11, 33, 999])
def test_np_arange_descending(n):
    assert schedules.np_arange(1000, 0, -1000 / n) == np.arange(1000, 0, -1000 / n).tolist()


def test_np_interp():
    table = np.random.default_rng(0).random(50).astype(np.float32).astype(np.float64)
    points = [0.0, 0.5, 3.0, 12.25, 48.999, 49.0, 60.0, -1.0]
    assert [schedules.np_interp(p, table.tolist()) for p in points] == np.interp(points, np.arange(50), table).tolist()


@pytest.mark.parametrize("spacing,offset,expected", [
    ("leading", 1, [751, 501, 251, 1]), ("trailing", 0, [999, 749, 499, 249]), ("linspace", 0, [999, 666, 333, 0])])
def test_spaced_timesteps(spacing, offset, expected):
    assert [round(t) for t in schedules.spaced_timesteps(spacing, 4, 1000, offset)] == expected


def test_karras_and_flow_shift():
    sigmas = schedules.karras_sigmas(0.002, 80.0, 5)
    assert sigmas[0] == pytest.approx(80.0, rel=1e-14) and sigmas[-1] == pytest.approx(0.002, rel=1e-14)
    ramp = np.linspace(0, 1, 5)
    ref = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert sigmas == pytest.approx(ref.tolist(), rel=1e-14)
    assert schedules.shift_flow_sigmas([1.0, 0.5, 0.0], 3.0) == [1.0, 0.75, 0.0]


def test_sigma_to_timestep_interpolates_log_sigma():
    log_sigmas = [math.log(s) for s in (0.1, 0.2, 0.4, 0.8)]
    assert schedules.sigma_to_timestep(0.2, log_sigmas) == pytest.approx(1.0)
    assert schedules.sigma_to_timestep(math.sqrt(0.08), log_sigmas) == pytest.approx(1.5)
    assert schedules.sigma_to_timestep(10.0, log_sigmas) == 3.0
    assert schedules.sigma_to_timestep(0.01, log_sigmas) == 0.0


def test_bad_beta_schedule():
    with pytest.raises(ValueError, match="beta_schedule"):
        schedules.alphas_cumprod(beta_schedule="cosine")
