"""GPU benchmark of whole few-step loops: diffusers' ``scheduler.step`` against fewstep's sampler
(eager, and replayed as one CUDA graph), on the same precomputed model outputs."""
from __future__ import annotations

import torch

import fewstep
from common import host_median_ms

SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="trailing")
SHAPES = {"sdxl 1x4x128x128": (1, 4, 128, 128), "16x16x256x256": (16, 16, 256, 256)}
STEPS = 4


def _schedulers():
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler
    return {"DDIM": (DDIMScheduler(**SDXL, clip_sample=False, set_alpha_to_one=False), {"eta": 0.0}),
            "TCD": (TCDScheduler(**SDXL), {"eta": 0.3}),
            "LCM": (LCMScheduler(**SDXL), {})}


def run(rec):
    for shape_name, shape in SHAPES.items():
        for name, (sched, step_kwargs) in _schedulers().items():
            x_T = torch.randn(shape, device="cuda")
            outputs = [torch.randn(shape, device="cuda") for _ in range(STEPS)]
            sched.set_timesteps(STEPS, device="cuda")
            gen = torch.Generator("cuda").manual_seed(0)
            kw = dict(step_kwargs, generator=gen) if name != "DDIM" else dict(step_kwargs)

            def diffusers_loop():
                sched._step_index = None  # restart the loop without re-running set_timesteps
                x = x_T
                for i, t in enumerate(sched.timesteps):
                    x = sched.step(outputs[i], t, x, **kw).prev_sample
                return x

            sampler = fewstep.samplers.from_diffusers(sched, **step_kwargs)
            sampler.set_timesteps(STEPS)

            def fewstep_loop():
                x = x_T
                for i in range(STEPS):
                    x = sampler.step(outputs[i], i, x)
                return x

            base = host_median_ms(diffusers_loop)
            rec.add("loop4", f"{name} {shape_name}", "diffusers", torch.float32, base)
            ms = host_median_ms(fewstep_loop)
            rec.add("loop4", f"{name} {shape_name}", "fewstep-eager", torch.float32, ms, "speedup_vs_diffusers",
                    base / ms)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fewstep_loop()  # warm-up on a side stream, as graph capture requires
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                fewstep_loop()
            ms = host_median_ms(graph.replay)
            rec.add("loop4", f"{name} {shape_name}", "fewstep-cudagraph", torch.float32, ms,
                    "speedup_vs_diffusers", base / ms)
