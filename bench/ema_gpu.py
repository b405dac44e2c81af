"""GPU benchmark of the multi-tensor EMA update over an SD1.5-sized model (860M fp32 parameters in
686 tensors, diffusers' UNet2DConditionModel shapes): diffusers' EMAModel per-tensor loop,
torch._foreach_lerp_, and fewstep.ema_update_ (one launch)."""
from __future__ import annotations

import torch

import fewstep
from common import gpu_median_ms


def sd15_shapes() -> list[torch.Size]:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return [p.shape for p in UNet2DConditionModel(cross_attention_dim=768).parameters()]


def run(rec, copy_gbps):
    shapes = sd15_shapes()
    for param_dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(s, device="cuda", dtype=param_dtype) for s in shapes]
        ema = [p.float().clone() for p in params]  # distinct memory even when params are fp32
        n = sum(p.numel() for p in params)
        moved = n * (8 + params[0].element_size())  # ema read + write, param read
        case = f"{n / 1e6:.1f}M in {len(params)} tensors, fp32 ema"
        decay = 0.9999

        def diffusers_loop():  # diffusers.training_utils.EMAModel.step
            for s, p in zip(ema, params):
                s.sub_((1 - decay) * (s - p))

        def foreach():
            torch._foreach_lerp_(ema, params if param_dtype == torch.float32 else [p.float() for p in params],
                                 1 - decay)

        def fused():
            fewstep.ema_update_(ema, params, decay)

        for provider, fn in (("diffusers EMAModel loop", diffusers_loop), ("torch._foreach_lerp_", foreach),
                             ("fewstep.ema_update_", fused)):
            ms = gpu_median_ms(fn)
            rec.add("ema", case, provider, param_dtype, ms, "pct_of_copy_bw",
                    100 * moved / (ms * 1e-3) / (copy_gbps * 1e9))
        rec.add("ema", case, "traffic floor at copy bw", param_dtype, moved / (copy_gbps * 1e9) * 1e3)
        del params, ema
        torch.cuda.empty_cache()
