"""Small models the method tests share: affine models whose losses can be computed by hand, and
the exact Gaussian-mixture teacher."""
import math

import torch
from torch import nn

import fewstep
from fewstep.toy import GaussianMixtureDenoiser

SCHEDULE = fewstep.VPSchedule()
ABAR = fewstep.samplers.schedules.alphas_cumprod()


class CondTeacher(nn.Module):
    """eps-prediction 0.5 x_t + c: the condition offset c makes cond and uncond outputs differ."""

    def forward(self, x, t, c=0.0):
        return 0.5 * x + c


class Affine(nn.Module):
    """Model ``s x_t + b``; remembers the kwargs of its last call."""

    def __init__(self, dim: int):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
        self.b = nn.Parameter(torch.linspace(-0.3, 0.4, dim, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append(kwargs)
        return self.s * x + self.b


def affine_teacher() -> fewstep.Denoiser:
    return fewstep.Denoiser(CondTeacher(), "eps", SCHEDULE)


def mixture(dim: int = 2, std: float = 0.15) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(ABAR.float(), shape=(dim,), num_modes=4, std=std, seed=1)


class MLP(nn.Module):
    """A small time-conditioned student for the distillation checks."""

    def __init__(self, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t):
        phase = math.pi * t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000
        return self.net(torch.cat([x, phase.sin(), phase.cos()], 1))
