"""GPU benchmark of the fused sampler step against the same math in eager PyTorch and torch.compile.

Three step shapes: a plain DDIM update (reads x and the model output), the same with CFG fused
(also reads the unconditional output), and an LCM/TCD-like stochastic step with CFG that also
reads noise and writes the denoised estimate.
"""
from __future__ import annotations

import torch

import fewstep
from fewstep.ops import StepCoeffs, sampler_step
from common import gpu_median_ms

SHAPES = {"sdxl 1x4x128x128": (1, 4, 128, 128), "sd15 32x4x64x64": (32, 4, 64, 64),
          "video 16x16x256x256": (16, 16, 256, 256), "video 32x16x256x256": (32, 16, 256, 256)}

# DDIM eps step from t=749 to t=499 on the scaled_linear schedule (values only set the arithmetic).
A, B, AP, BP, W, CS, CO = 0.2765, 0.9610, 0.5000, 0.8660, 7.5, 0.0025, 0.9987
DDIM = StepCoeffs(a_x=1 / A, a_m=-B / A, o_0=AP, o_m=BP)
LCM = StepCoeffs(a_x=1 / A, a_m=-B / A, o_x=AP * CS, o_0=AP * CO, o_z=BP, d_x=CS, d_0=CO)


def eager_ddim(x, m):
    x0 = (x - B * m) / A
    return AP * x0 + BP * m


def eager_cfg(x, c, u):
    m = u + W * (c - u)
    return eager_ddim(x, m)


def eager_lcm(x, c, u, z):
    m = u + W * (c - u)
    x0 = (x - B * m) / A
    denoised = CS * x + CO * x0
    return AP * denoised + BP * z, denoised


def run(rec, copy_gbs: float):
    compiled = {f.__name__: torch.compile(f) for f in (eager_ddim, eager_cfg, eager_lcm)}
    for shape_name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            numel = torch.Size(shape).numel()
            if numel * dtype.itemsize < (32 << 20) and shape_name.startswith("video"):
                continue
            x, c, u, z = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
            cases = {
                "ddim": (3, {"eager": lambda: eager_ddim(x, c), "torch.compile": lambda: compiled["eager_ddim"](x, c),
                             "fused": lambda: sampler_step(x, c, DDIM)}),
                "ddim+cfg": (4, {"eager": lambda: eager_cfg(x, c, u),
                                 "torch.compile": lambda: compiled["eager_cfg"](x, c, u),
                                 "fused": lambda: sampler_step(x, c, DDIM, uncond=u, guidance_scale=W)}),
                "lcm+cfg+noise+x0": (6, {"eager": lambda: eager_lcm(x, c, u, z),
                                         "torch.compile": lambda: compiled["eager_lcm"](x, c, u, z),
                                         "fused": lambda: sampler_step(x, c, LCM, uncond=u, guidance_scale=W,
                                                                       noise=z, return_x0=True)}),
            }
            for step_name, (tensors_moved, providers) in cases.items():
                nbytes = tensors_moved * numel * dtype.itemsize
                for provider, fn in providers.items():
                    backends = ("cuda", "triton") if provider == "fused" else ("auto",)
                    for backend in backends:
                        with fewstep.backend(backend):
                            ms = gpu_median_ms(fn)
                        label = f"fewstep-{backend}" if provider == "fused" else provider
                        gbs = nbytes / (ms * 1e-3) / 1e9
                        rec.add("sampler_step", f"{step_name} {shape_name}", label, dtype, ms,
                                "pct_of_copy_bw", 100 * gbs / copy_gbs)
