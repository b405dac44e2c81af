"""A small diffusion "model" whose exact answer is known: the optimal denoiser of a Gaussian mixture.

Data x0 ~ sum_k pi_k N(mu_k, s^2 I). Under x_t = alpha x0 + sigma eps, x_t | k ~ N(alpha mu_k,
(alpha^2 s^2 + sigma^2) I), so E[x0 | x_t] is a responsibility-weighted sum of per-component
posterior means. It gives the demo and tests a real denoiser (sampling quality is measurable as
the samples' distance to the modes against real data's) with no weights to download.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser of a Gaussian mixture on image-shaped data, for a DDPM noise schedule.

    ``forward(x_t, t)`` returns the ``prediction`` ("epsilon", "sample" or "v_prediction") at
    discrete timestep ``t`` (a number or a 0-dim/[B] tensor, fractional timesteps interpolate
    log-sigma like diffusers' Karras/Euler schedules).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, shape=(3, 8, 8), num_modes: int = 10, std: float = 0.3,
                 prediction: str = "epsilon", seed: int = 0):
        super().__init__()
        if prediction not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction: expected 'epsilon', 'sample' or 'v_prediction', got {prediction!r}")
        if std <= 0:
            raise ValueError(f"std: expected a positive mode width, got {std}")
        gen = torch.Generator().manual_seed(seed)
        dim = math.prod(shape)
        self.shape, self.std, self.prediction = tuple(shape), float(std), prediction
        self.register_buffer("means", torch.randn(num_modes, dim, generator=gen, dtype=torch.float64).sign() * 0.8)
        log_sigmas = 0.5 * torch.log((1 - alphas_cumprod.double()) / alphas_cumprod.double())
        self.register_buffer("log_sigmas", log_sigmas)
        self._log_sigmas_host = log_sigmas.tolist()

    def _alpha_sigma(self, t, batch: int, device):
        """(alpha, sigma) at timestep t: host floats for a number or CPU scalar (no device traffic,
        so sampling loops stay sync-free and graph-capturable), [B, 1] tensors for a device tensor."""
        last = len(self.log_sigmas) - 1
        if isinstance(t, torch.Tensor) and (t.device.type != "cpu" or t.dim() > 0):
            t = t.to(device=device, dtype=torch.float64).reshape(-1).expand(batch).clamp(0, last)
            lo = t.floor().long().clamp(max=last - 1)
            frac = t - lo
            log_sigma = (1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[lo + 1]
            alpha = torch.rsqrt(1 + (2 * log_sigma).exp())
            return alpha[:, None], (log_sigma.exp() * alpha)[:, None]
        t = min(max(float(t), 0.0), float(last))
        lo = min(int(math.floor(t)), last - 1)
        frac = t - lo
        log_sigma = (1 - frac) * self._log_sigmas_host[lo] + frac * self._log_sigmas_host[lo + 1]
        alpha = 1.0 / math.sqrt(1.0 + math.exp(2 * log_sigma))
        return alpha, math.exp(log_sigma) * alpha

    def posterior_mean(self, x_t: torch.Tensor, t) -> torch.Tensor:
        x = x_t.double().flatten(1)
        alpha, sigma = self._alpha_sigma(t, x.shape[0], x.device)
        var = alpha**2 * self.std**2 + sigma**2                      # float or [B, 1]
        # |x - alpha mu_k|^2 without a [B, K, D] temporary; equal weights and widths
        sq = x.pow(2).sum(1, keepdim=True) - 2 * alpha * (x @ self.means.T) + alpha**2 * self.means.pow(2).sum(1)
        logits = -0.5 * sq / var
        resp = logits.softmax(dim=1)                                  # [B, K]
        gain = alpha * self.std**2 / var                              # [B, 1]
        x0 = resp @ self.means + gain * (x - alpha * (resp @ self.means))
        return x0, alpha, sigma

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        x0, alpha, sigma = self.posterior_mean(x_t, t)
        x = x_t.double().flatten(1)
        if self.prediction == "sample":
            out = x0
        else:
            eps = (x - alpha * x0) / sigma
            out = eps if self.prediction == "epsilon" else alpha * eps - sigma * x0
        return out.reshape(x_t.shape).to(x_t.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(len(self.means), (n,), generator=generator, device=self.means.device)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64, device=self.means.device)
        return (self.means[k] + self.std * noise).reshape(n, *self.shape)

    def spread(self, x0: torch.Tensor) -> torch.Tensor:
        """Mean squared distance of ``x0`` to its nearest mode over that of real data (D s^2).

        1 for samples from the true distribution; below 1 means samples collapsed onto the modes
        (too smooth), above 1 means they are noisy or between modes.
        """
        x = x0.double().flatten(1)
        sq = x.pow(2).sum(1, keepdim=True) - 2 * (x @ self.means.T) + self.means.pow(2).sum(1)
        return sq.min(dim=1).values.mean() / (x.shape[1] * self.std**2)
