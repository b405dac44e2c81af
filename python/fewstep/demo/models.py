"""The demo's networks and its teacher: a class-conditional MLP denoiser trained on the spot."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from fewstep.denoiser import Denoiser, VPSchedule
from fewstep.ops.ema import ema_update_

# DDPM's linear schedule: at t = 999 almost no signal is left (alpha ~ 0.006), so one DDIM step
# from pure noise lands on the data mean and the task is not trivial.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim] sinusoidal features (as diffusion models embed timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class MLPDenoiser(nn.Module):
    """``model(x_t, t, class_labels=None, timestep_cond=None)`` on flat [B, dim] data.

    ``class_labels`` index ``num_classes + 1`` embeddings (the last is the null class that CFG's
    unconditional branch uses, and what ``None`` means). ``timestep_cond`` is an optional
    [B, cond_dim] input (LCD's guidance-scale embedding); its projection starts at zero so a student
    copied from the teacher computes the teacher's function until it learns to use it.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 256, depth: int = 4, cond_dim: int = 0,
                 time_dim: int = 64):
        super().__init__()
        self.dim, self.num_classes, self.time_dim = dim, num_classes, time_dim
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.cond = None
        if cond_dim:
            self.cond = nn.Linear(cond_dim, hidden)
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden * 2), nn.SiLU(),
                                                  nn.Linear(hidden * 2, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(batch)
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, device=x_t.device, dtype=torch.long)
        h = self.inp(x_t) + self.time(sinusoidal_embedding(t, self.time_dim)) + self.label(class_labels)
        if timestep_cond is not None:
            if self.cond is None:
                raise ValueError("timestep_cond: this model was built with cond_dim=0 and takes none")
            h = h + self.cond(timestep_cond)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def with_cond_input(model: MLPDenoiser, cond_dim: int) -> MLPDenoiser:
    """A copy of ``model`` that also takes ``timestep_cond`` (zero-initialised: same function)."""
    hidden = model.inp.out_features
    student = MLPDenoiser(model.dim, model.num_classes, hidden, len(model.blocks), cond_dim, model.time_dim)
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cond.") for k in missing), (missing, unexpected)
    return student.to(next(model.parameters()).device)


def train_teacher(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, steps: int,
                  batch_size: int = 512, hidden: int = 256, depth: int = 4, lr: float = 2e-3,
                  label_dropout: float = 0.15, seed: int = 0, device: str | torch.device = "cpu",
                  log=print) -> Denoiser:
    """A v-prediction teacher on the DDPM schedule, with label dropout so CFG is available.

    v rather than eps: at t = 999 this schedule keeps alpha ~ 0.0064 of the signal, so an eps
    model's x0 = (x_t - sigma eps) / alpha multiplies its error by ~150 where one-step students
    start; x0 = alpha x_t - sigma v does not divide.
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    model = MLPDenoiser(train_x.shape[1], num_classes, hidden, depth).to(device)
    teacher = Denoiser(model, prediction="v", schedule=VPSchedule(**SCHEDULE))
    x_all, y_all = train_x.to(device), train_y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator(device).manual_seed(seed)
    ema = [p.detach().clone() for p in model.parameters()]
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen, device=device)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(batch_size, generator=gen, device=device) < label_dropout,
                        torch.full_like(y, num_classes), y)
        t = torch.randint(0, 1000, (batch_size,), generator=gen, device=device)
        eps = torch.randn(x0.shape, generator=gen, device=device)
        alpha, sigma = teacher.schedule.alpha_sigma(t, x0)
        x_t, v = (alpha * x0 + sigma * eps).float(), (alpha * eps - sigma * x0).float()
        loss = (model(x_t, t, class_labels=y) - v).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update_(ema, [p.detach() for p in model.parameters()], 0.999 if step > steps // 10 else 0.0)
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"  teacher step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    model.requires_grad_(False).eval()
    return teacher
