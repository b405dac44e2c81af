"""GPU benchmark of DMD2's generator loss head (forward + backward): DMD2's official eager chain,
torch.compile of the same chain, and fewstep.losses.dmd, at SD1.5, SDXL and Wan-480p latent
shapes. Times: eager calls (host included) and the same forward + backward replayed as a CUDA graph
(device time). Transient memory is the peak above inputs and x.grad, in input-sized buffers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fewstep
from common import gpu_median_ms, graph_replay_ms

SHAPES = {"sd15 32x4x64x64": (32, 4, 64, 64), "sdxl 2x4x128x128": (2, 4, 128, 128),
          "wan480p 1x16x21x60x104": (1, 16, 21, 60, 104)}


def official(x, real, fake):  # DMD2 (tianweiy/DMD2, sd_guidance.py): compute_distribution_matching_loss
    with torch.no_grad():
        p_real = x - real
        p_fake = x - fake
        dims = list(range(1, x.dim()))
        grad = torch.nan_to_num((p_real - p_fake) / torch.abs(p_real).mean(dim=dims, keepdim=True))
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")


def fused(x, real, fake):
    return fewstep.losses.dmd(x, real, fake)


def run(rec):
    compiled = torch.compile(official, fullgraph=True)
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            real, fake = torch.randn_like(x).detach(), torch.randn_like(x).detach()
            nbytes = x.numel() * x.element_size()
            for provider, fn in (("DMD2 official eager", official), ("torch.compile", compiled),
                                 ("fewstep", fused)):
                def step():
                    fn(x, real, fake).backward()
                    x.grad = None

                step()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn(x, real, fake).backward()
                torch.cuda.synchronize()
                transient = (torch.cuda.max_memory_allocated() - base - nbytes) / nbytes  # x.grad excluded
                x.grad = None
                rec.add("dmd_loss", name, provider, dtype, gpu_median_ms(step), "transient_buffers", transient)

                def graphed():
                    x.grad = None
                    fn(x, real, fake).backward()

                try:
                    rec.add("dmd_loss", name, provider + " (CUDA graph)", dtype, graph_replay_ms(graphed))
                except RuntimeError as e:  # a provider that cannot be captured is reported, not timed
                    print(f"dmd_loss: {provider} {name}: no CUDA graph: {str(e).splitlines()[0]}", flush=True)
                x.grad = None
            del x, real, fake
            torch.cuda.empty_cache()
