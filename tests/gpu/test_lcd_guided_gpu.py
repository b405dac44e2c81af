"""LCD (EMA target and LCM-LoRA) and guided distillation on the GPU: training steps and sampling
without host syncs, the same loss as on the CPU for the same draws, and bf16 autocast."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import HAS_CUDA
from test_distill_methods_gpu import ConvNet, _syncs
from torch import nn

import fewstep
from fewstep.distill import LCD, GuidedDistillation, add_lora

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")

SCHEDULE = fewstep.VPSchedule()
EMBED = 16


class WConvNet(ConvNet):
    """ConvNet that also takes LCM's w-embedding (``timestep_cond``)."""

    def __init__(self):
        super().__init__()
        self.w_proj = nn.Linear(EMBED, 32)

    def forward(self, x, t, label=None, timestep_cond=None):
        out = super().forward(x, t, label)
        if timestep_cond is not None:
            out = out + self.w_proj(timestep_cond.to(x.dtype)).mean(1).reshape(-1, 1, 1, 1)
        return out


def _setup(device: str = "cuda"):
    torch.manual_seed(0)
    teacher_net = ConvNet().to(device)
    teacher = fewstep.Denoiser(teacher_net, "eps", SCHEDULE)
    null = {"label": torch.zeros(8, device=device)}
    lcd = LCD(teacher, WConvNet().to(device), w_min=1.0, w_max=7.0, null_cond=null, w_embedding=EMBED)
    lora_net = add_lora(copy.deepcopy(teacher_net), rank=4)
    lcm_lora = LCD(fewstep.Denoiser(lora_net, "eps", SCHEDULE), lora_net, w_min=1.0, w_max=7.0, null_cond=null,
                   target="self")
    guided = GuidedDistillation(teacher, WConvNet().to(device), w_min=0.0, w_max=4.0, null_cond=null,
                                w_embedding=EMBED, num_steps=8)
    batch = {"x0": torch.randn(8, 4, 16, 16).to(device), "cond": {"label": torch.ones(8, device=device)}}
    return lcd, lcm_lora, guided, batch


def _train_step(method, batch):
    loss, _ = method.loss("student", batch, 0)
    loss.backward()
    method.after_step("student", 0)


def test_training_steps_and_sampling_make_no_host_sync():
    lcd, lcm_lora, guided, batch = _setup()
    noise = torch.randn(8, 4, 16, 16, device="cuda")
    cond = batch["cond"]
    for name, method in (("lcd", lcd), ("lcm_lora", lcm_lora), ("guided stage 1", guided)):
        assert _syncs(lambda: _train_step(method, batch)) == 0, name
        assert _syncs(lambda: method.sample(noise, 4, **cond)) == 0, name
    guided.next_round()
    assert _syncs(lambda: _train_step(guided, batch)) == 0, "guided stage 2"


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls, so that the GPU's model outputs match the CPU's to ~1e-6."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_same_loss_as_cpu_for_the_same_draws(no_tf32):
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(8, 4, 16, 16, generator=gen)
    index = torch.randint(0, 50, (8,), generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    w = torch.rand(8, generator=gen) * 4
    losses = {}
    for device in ("cuda", "cpu"):
        lcd, lcm_lora, guided, batch = _setup(device)
        draws = dict(noise=noise.to(device), w=w.to(device))
        losses[device] = [
            lcd.consistency_loss(batch["x0"], batch["cond"], solver_index=index.to(device), **draws)[0],
            lcm_lora.consistency_loss(batch["x0"], batch["cond"], solver_index=index.to(device), **draws)[0],
            guided.guidance_loss(batch["x0"], batch["cond"], t=t.to(device), **draws)[0]]
    for name, on_gpu, on_cpu in zip(("lcd", "lcm_lora", "guided"), losses["cuda"], losses["cpu"]):
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast():
    lcd, lcm_lora, guided, batch = _setup()
    for method in (lcd, lcm_lora, guided):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = method.loss("student", batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert all(torch.isfinite(p.grad).all() for p in method.parameters_of("student") if p.grad is not None)
