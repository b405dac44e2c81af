"""GPU benchmark of the trainer.

``trainer_opt_ema``: optimizer step plus EMA over an SD1.5-sized model (860M fp32 parameters, the
UNet's shapes): torch AdamW (foreach, the trainer's default; and fused) followed by
``fewstep.ema_update_`` (two passes), against ``fewstep.optim.FusedAdamW(ema_decay=...)``, whose
single pass the trainer folds the EMA into (skipped while that optimizer is not installed).
``trainer_step``: wall time of one whole training step of a small two-phase method through
``Trainer.train_step`` against the same step written as a plain loop (the trainer's overhead).
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.nn import functional as F

import fewstep
from common import gpu_median_ms, host_median_ms
from ema_gpu import sd15_shapes
from fewstep.distill import DistillationMethod
from fewstep.train import Trainer

DECAY = 0.9999


def _opt_ema(rec, copy_gbps):
    shapes = sd15_shapes()
    n = sum(s.numel() for s in shapes)
    case = f"SD1.5 {n / 1e6:.0f}M fp32, {len(shapes)} tensors"

    def setup():
        params = [nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        return params

    def two_passes_ms(adamw_kwargs):  # its tensors are freed on return
        params = setup()
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-5, **adamw_kwargs)

        def step():
            opt.step()
            fewstep.ema_update_(ema, params, DECAY)
        return gpu_median_ms(step)

    # adam reads p, g, m, v and writes p, m, v (28 B/param); the EMA reads ema, p and writes ema (12 B)
    for provider, kwargs in (("AdamW foreach + ema_update_", {"foreach": True}),
                             ("AdamW fused + ema_update_", {"fused": True})):
        ms = two_passes_ms(kwargs)
        torch.cuda.empty_cache()
        rec.add("trainer_opt_ema", case, provider, torch.float32, ms, "pct_of_copy_bw",
                100 * n * 40 / (ms * 1e-3) / (copy_gbps * 1e9))
    rec.add("trainer_opt_ema", case, "two-pass traffic floor", torch.float32, n * 40 / (copy_gbps * 1e9) * 1e3)
    try:
        from fewstep.optim import FusedAdamW
    except ImportError as e:
        print(f"trainer_opt_ema: fewstep.optim.FusedAdamW not available ({e}); folded EMA not timed", flush=True)
        return
    params = setup()
    opt = FusedAdamW(params, lr=1e-5, ema_decay=DECAY)
    ms = gpu_median_ms(opt.step)
    rec.add("trainer_opt_ema", case, "FusedAdamW, EMA folded", torch.float32, ms, "pct_of_copy_bw",
            100 * n * 36 / (ms * 1e-3) / (copy_gbps * 1e9))
    del params, opt
    torch.cuda.empty_cache()


class _Regress(DistillationMethod):
    """A student MLP regressing a frozen teacher MLP, and a critic every step: two phases."""
    phases = ("student", "critic")

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        make = lambda: nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))  # noqa: E731
        self.teacher, self.student, self.critic = make().requires_grad_(False), make(), nn.Linear(dim, 1)

    def parameters_of(self, phase):
        return list((self.student if phase == "student" else self.critic).parameters())

    def loss(self, phase, batch, step):
        x = batch["x0"]
        if phase == "student":
            return F.mse_loss(self.student(x), self.teacher(x)), {}
        with torch.no_grad():
            fake = self.student(x)
        return F.mse_loss(self.critic(fake).squeeze(1), x.pow(2).mean(1)), {}


def _step_overhead(rec):
    dim, hidden, batch = 256, 1024, 256
    case = f"MLP {dim}-{hidden}, B={batch}, bf16, 2 phases, EMA"
    torch.manual_seed(0)
    data = lambda index, gen: {"x0": torch.randn(batch, dim, device="cuda", generator=gen)}  # noqa: E731
    method = _Regress(dim, hidden)
    trainer = Trainer(method, data, max_steps=10**9, device="cuda", progress=False, clip_grad_norm=1.0,
                      ema={"student": (method.student, DECAY)})
    rec.add("trainer_step", case, "Trainer.train_step", torch.bfloat16, host_median_ms(trainer.train_step))
    if importlib.util.find_spec("fewstep.optim") is not None:
        method = _Regress(dim, hidden)
        trainer = Trainer(method, data, max_steps=10**9, device="cuda", progress=False, clip_grad_norm=1.0,
                          ema={"student": (method.student, DECAY)}, optimizers="fused_adamw")
        rec.add("trainer_step", case, "Trainer.train_step, FusedAdamW (EMA folded)", torch.bfloat16,
                host_median_ms(trainer.train_step))

    plain = _Regress(dim, hidden).cuda()
    opts = {ph: torch.optim.AdamW(plain.parameters_of(ph), lr=1e-4) for ph in plain.phases}
    ema = [p.detach().float().clone() for p in plain.student.parameters()]
    gen = torch.Generator("cuda").manual_seed(0)

    def plain_step():
        batch_ = data(0, gen)
        for ph in plain.phases:
            opts[ph].zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = plain.loss(ph, batch_, 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters_of(ph), 1.0)
            opts[ph].step()
        fewstep.ema_update_(ema, list(plain.student.parameters()), DECAY)
    rec.add("trainer_step", case, "hand-written loop", torch.bfloat16, host_median_ms(plain_step))


def run(rec, copy_gbps):
    _opt_ema(rec, copy_gbps)
    _step_overhead(rec)
