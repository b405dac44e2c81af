"""The demo's model (exact Gaussian-mixture denoiser) and the `fewstep demo` command."""
import subprocess
import sys

import pytest
import torch

from fewstep import samplers
from fewstep.demo.samplers import SD_SCHEDULE, run
from fewstep.toy import GaussianMixtureDenoiser

ALPHAS = samplers.schedules.alphas_cumprod(**SD_SCHEDULE)


def test_single_mode_posterior_is_the_gaussian_formula():
    model = GaussianMixtureDenoiser(ALPHAS, shape=(2, 3, 5), num_modes=1, std=0.4, prediction="sample")
    x_t = torch.randn(3, 2, 3, 5, dtype=torch.float64)
    t = 417
    a, s = ALPHAS[t].double().sqrt(), (1 - ALPHAS[t].double()).sqrt()
    mu = model.means[0].reshape(2, 3, 5)
    expected = mu + a * 0.16 / (a**2 * 0.16 + s**2) * (x_t - a * mu)
    torch.testing.assert_close(model(x_t, t), expected)
    # A [B] device tensor of timesteps and a host scalar give the same answer.
    torch.testing.assert_close(model(x_t, torch.full((3,), float(t))), expected)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_predictions_are_consistent(prediction):
    gen = torch.Generator().manual_seed(0)
    model = GaussianMixtureDenoiser(ALPHAS, prediction=prediction)
    x0_model = GaussianMixtureDenoiser(ALPHAS, prediction="sample")
    x_t = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = 300.5  # fractional: interpolated log-sigma
    out, x0 = model(x_t, t), x0_model(x_t, t)
    alpha, sigma = model._alpha_sigma(t, 4, x_t.device)
    if prediction == "epsilon":
        torch.testing.assert_close((x_t - sigma * out) / alpha, x0)
    else:
        torch.testing.assert_close(alpha * x_t - sigma * out, x0)


def test_spread_of_real_data_is_one_and_of_noise_is_large():
    gen = torch.Generator().manual_seed(1)
    model = GaussianMixtureDenoiser(ALPHAS)
    assert abs(model.spread(model.sample_data(4096, gen)).item() - 1.0) < 0.02
    assert model.spread(torch.randn(512, 3, 8, 8, generator=gen)).item() > 5


def test_demo_runs_and_more_steps_get_closer_to_the_data():
    results = run(device="cpu", num_samples=256, steps=(1, 25), reps=2)
    for name, by_steps in results["spread"].items():
        assert abs(by_steps[25] - 1) < abs(by_steps[1] - 1), name
    for name, t in results["step_ms"].items():
        assert t["fused"] > 0 and t["eager"] > 0, name


def test_cli_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "samplers", "--steps", "0"], capture_output=True, text=True)
    assert proc.returncode != 0 and "--steps" in proc.stderr
