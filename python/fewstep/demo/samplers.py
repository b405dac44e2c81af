"""``fewstep samplers``: few-step sampling of a model whose right answer is known, with timings.

The model is the exact denoiser of a Gaussian mixture (:mod:`fewstep.toy`), so sample quality is a
number — the samples' mean squared distance to the nearest mode over real data's (1.00 = the true
distribution) — rather than a picture. Every sampler runs at 1–8 steps, then each step is
timed on fewstep's fused kernel against the same step on the pure-PyTorch reference.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fewstep
from fewstep import samplers
from fewstep.toy import GaussianMixtureDenoiser

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def demo_samplers() -> dict[str, samplers.Sampler]:
    return {
        "DDIM": samplers.DDIMSampler(**SD_SCHEDULE, timestep_spacing="trailing", clip_sample=False,
                                     set_alpha_to_one=False),
        "DPM-Solver++(2M)": samplers.DPMSolverMultistepSampler(**SD_SCHEDULE, timestep_spacing="trailing"),
        "Euler (Karras)": samplers.EulerSampler(**SD_SCHEDULE, use_karras_sigmas=True),
        "LCM": samplers.LCMSampler(**SD_SCHEDULE),
        "TCD (eta 0.3)": samplers.TCDSampler(**SD_SCHEDULE, eta=0.3),
    }


def _time_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(device: str = "auto", num_samples: int = 4096, steps=(1, 2, 4, 8, 25), seed: int = 0, reps: int = 20) -> dict:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    alphas_cumprod = samplers.schedules.alphas_cumprod(**SD_SCHEDULE)
    model = GaussianMixtureDenoiser(alphas_cumprod).to(dev)
    gen = torch.Generator(dev).manual_seed(seed)
    shape = (num_samples, *model.shape)
    data_spread = model.spread(model.sample_data(num_samples, gen)).item()
    print(f"fewstep {fewstep.__version__} on {dev} — build: {fewstep.build_info()}")
    print(f"Model: exact denoiser of a {len(model.means)}-mode Gaussian mixture on {model.shape} data "
          f"(SD's scaled_linear schedule, eps-prediction).")
    print(f"Quality: spread of {num_samples} samples = mean squared distance to the nearest mode over real "
          f"data's\n(real data: {data_spread:.2f}; below 1 collapsed onto the modes, above 1 noisy or between modes).\n")
    header = f"{'sampler':20s}" + "".join(f"{f'{n} step' + ('s' if n > 1 else ''):>11s}" for n in steps)
    print(header)
    results = {"device": str(dev), "data_spread": data_spread, "spread": {}, "step_ms": {}}
    with torch.no_grad():
        for name, sampler in demo_samplers().items():
            row = []
            for n in steps:
                x_T = torch.randn(shape, generator=gen, device=dev)
                x0 = samplers.sample(model, x_T, sampler, num_steps=n, generator=gen)
                row.append(model.spread(x0).item())
            results["spread"][name] = dict(zip(steps, row))
            print(f"{name:20s}" + "".join(f"{v:11.2f}" for v in row))

        print(f"\nTime per sampler step on {num_samples}x{'x'.join(map(str, model.shape))} fp32 "
              f"(model outputs precomputed; median of {reps}):")
        print(f"{'sampler':20s}{'fused (ms)':>12s}{'eager PyTorch (ms)':>20s}{'speed-up':>10s}")
        x = torch.randn(shape, generator=gen, device=dev)
        out = torch.randn(shape, generator=gen, device=dev)
        for name, sampler in demo_samplers().items():
            sampler.set_timesteps(4)

            def four_steps():
                y = x
                for i in range(4):
                    y = sampler.step(out, i, y, generator=gen)
                return y

            fused = _time_ms(four_steps, dev, reps) / 4
            with fewstep.backend("reference"):
                eager = _time_ms(four_steps, dev, reps) / 4
            results["step_ms"][name] = {"fused": fused, "eager": eager}
            print(f"{name:20s}{fused:12.3f}{eager:20.3f}{eager / fused:9.1f}x")
    print("\nMulti-step solvers (DDIM, DPM-Solver++) need several steps on a model that was not distilled;"
          "\nLCM/TCD expect a consistency-distilled model — few-step generators come from distillation.")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fewstep samplers", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--steps", default="1,2,4,8,25", help="comma-separated step counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    if args.samples < 2 or any(s < 1 for s in steps):
        parser.error(f"--samples must be >= 2 and --steps positive, got {args.samples} and {args.steps}")
    run(args.device, args.samples, steps, args.seed)
