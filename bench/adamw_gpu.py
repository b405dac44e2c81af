"""GPU benchmark of an optimizer step with an EMA over an SD1.5-sized model (860M fp32 parameters in
686 tensors, diffusers' UNet2DConditionModel shapes): fewstep.optim.FusedAdamW(ema_decay=...), which
updates parameters, moments and EMA in one pass, against torch.optim.AdamW(fused=True) followed by
fewstep.ema_update_, and torch.optim.AdamW(foreach=True) followed by torch._foreach_lerp_; and the
AdamW step alone, fewstep against torch's fused kernel.

Traffic floors per fp32 element: AdamW + EMA in one pass reads parameter, gradient, two moments and
the EMA and writes all but the gradient (36 bytes); AdamW alone moves 28 bytes, the EMA alone 12."""
from __future__ import annotations

import statistics
import time

import torch

import fewstep
from common import gpu_median_ms
from ema_gpu import sd15_shapes
from fewstep.optim import FusedAdamW

DECAY = 0.9999


def host_enqueue_ms(step, reps: int = 10) -> float:
    """Median host time of one call (Python, checks, launches), the device idle at its start: the
    step stays device-bound while this is below the device time."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def run(rec, copy_gbps):
    shapes = sd15_shapes()
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    case = f"{n / 1e6:.1f}M in {len(params)} tensors, fp32"
    floor_ms = {"adamw+ema": 36 * n / (copy_gbps * 1e9) * 1e3, "adamw": 28 * n / (copy_gbps * 1e9) * 1e3}

    def fewstep_fused():
        opt = FusedAdamW(params, lr=1e-5, ema_decay=DECAY)
        return opt.step

    def torch_fused_then_ema_update():
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        ema = [p.detach().clone() for p in params]

        def step():
            opt.step()
            fewstep.ema_update_(ema, params, DECAY)
        return step

    def torch_foreach_then_foreach_lerp():
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
        ema = [p.detach().clone() for p in params]

        def step():
            opt.step()
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - DECAY)
        return step

    def fewstep_adamw_only():
        return FusedAdamW(params, lr=1e-5).step

    def torch_fused_only():
        return torch.optim.AdamW(params, lr=1e-5, fused=True).step

    runs = (("adamw+ema", "fewstep FusedAdamW(ema)", fewstep_fused),
            ("adamw+ema", "torch fused + ema_update_", torch_fused_then_ema_update),
            ("adamw+ema", "torch foreach + lerp_", torch_foreach_then_foreach_lerp),
            ("adamw", "fewstep FusedAdamW", fewstep_adamw_only),
            ("adamw", "torch AdamW fused", torch_fused_only))
    for work, provider, make in runs:
        step = make()  # allocates the optimizer state (and EMA) outside the timing
        step()
        ms = gpu_median_ms(step)
        rec.add("adamw", f"{case}, {work}", provider, torch.float32, ms, "pct_of_floor",
                100 * floor_ms[work] / ms)
        rec.add("adamw", f"{case}, {work}", provider + ", host", torch.float32, host_enqueue_ms(step))
        del step
        torch.cuda.empty_cache()
    for work, ms in floor_ms.items():
        rec.add("adamw", f"{case}, {work}", "traffic floor at copy bw", torch.float32, ms)
