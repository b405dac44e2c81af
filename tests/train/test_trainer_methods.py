"""The trainer on fewstep's own methods (DMD2 with its two time-scale phases and GAN head, LCD with
its EMA target network, BOOT), under DDP and FSDP2 on a one-rank gloo group: a few steps run, and a
run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fewstep
from fewstep.distill.boot import BOOT
from fewstep.distill.dmd2 import DMD2
from fewstep.distill.lcd import LCD
from fewstep.toy import GaussianMixtureDenoiser
from fewstep.train import Trainer

SCHEDULE = fewstep.VPSchedule()


class _MLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, **cond):
        phase = math.pi * t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000
        return self.net(torch.cat([x, phase.sin(), phase.cos()], 1))


def _teacher():
    toy = GaussianMixtureDenoiser(fewstep.samplers.schedules.alphas_cumprod().float(), shape=(2,), num_modes=4,
                                  std=0.15, seed=1)
    return fewstep.Denoiser(toy, "eps", SCHEDULE), toy


def _dmd2():
    teacher, _ = _teacher()
    head = nn.Linear(2, 1)
    return DMD2(teacher, fewstep.Denoiser(_MLP(), "x0", SCHEDULE), fewstep.Denoiser(_MLP(), "x0", SCHEDULE),
                dfake_gen_update_ratio=2, gan_head=head)


def _lcd():
    teacher, _ = _teacher()
    return LCD(teacher, fewstep.Denoiser(_MLP(), "eps", SCHEDULE), num_ddim_timesteps=10, w_min=0.0, w_max=0.0)


def _boot():
    teacher, _ = _teacher()
    return BOOT(teacher, fewstep.Denoiser(_MLP(), "x0", SCHEDULE), num_intervals=8)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@pytest.mark.parametrize("make", [_dmd2, _lcd, _boot], ids=["dmd2", "lcd", "boot"])
def test_methods_train_and_resume_exactly(one_rank_group, tmp_path, make, parallel):
    _, toy = _teacher()

    def data(index, generator):
        return {"x0": toy.sample_data(8, generator=generator).float()}

    def trainer(**kwargs):
        torch.manual_seed(0)
        method = make()
        student = getattr(method, "generator", None) or method.student
        return Trainer(method, data, max_steps=4, mixed_precision="no", progress=False, parallel=parallel,
                       lr=1e-3, ema={"student": (student.model, 0.9)}, clip_grad_norm=1.0, **kwargs)

    whole = trainer()
    whole.train()
    part = trainer(checkpoint_every=2, out_dir=str(tmp_path))
    part.max_steps = 2
    part.train()
    resumed = trainer(out_dir=str(tmp_path)).resume()
    resumed.train()
    a, b = whole.model_state_dict(), resumed.model_state_dict()
    assert a.keys() == b.keys() and not any(k.startswith("teacher.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, value in whole.ema_state_dict("student").items():
        assert torch.equal(value, resumed.ema_state_dict("student")[key]), key
