"""How the demo trains its teacher and distills it: one function per method, settings per dataset."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from fewstep import samplers
from fewstep.demo import data as demo_data
from fewstep.demo import figure
from fewstep.demo.models import SCHEDULE, train_teacher as _train_teacher
from fewstep.denoiser import Denoiser


@dataclasses.dataclass
class Config:
    teacher_steps: int
    hidden: int
    depth: int
    distill_steps: int
    batch_size: int
    seed: int = 0


def config_for(name: str, quick: bool = False, seed: int = 0) -> Config:
    if quick:
        return Config(teacher_steps=60, hidden=64, depth=2, distill_steps=20, batch_size=128, seed=seed)
    if name == "mixture2d":
        return Config(teacher_steps=3000, hidden=256, depth=4, distill_steps=1500, batch_size=512, seed=seed)
    return Config(teacher_steps=4000, hidden=512, depth=4, distill_steps=1500, batch_size=256, seed=seed)


def train_teacher(ds: demo_data.Dataset, config: Config, device: torch.device, log) -> Denoiser:
    return _train_teacher(ds.train_x, ds.train_y, ds.num_classes, steps=config.teacher_steps,
                          batch_size=config.batch_size, hidden=config.hidden, depth=config.depth,
                          seed=config.seed, device=device, log=log)


def eval_noise(ds: demo_data.Dataset, device: torch.device, seed: int) -> torch.Tensor:
    """The same starting noise for every model, one point per held-out point."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(ds.eval_size, ds.dim, generator=gen).to(device)


def panel(ds: demo_data.Dataset, samples: torch.Tensor) -> torch.Tensor:
    if ds.image_shape is not None:
        return figure.image_grid_panel(samples, ds.image_shape)
    return figure.scatter_panel(samples)


def measure(model_name: str, sampler_name: str, steps: int, nfe: int, ds: demo_data.Dataset,
            generate: Callable[[], torch.Tensor], device: torch.device) -> tuple[dict, tuple[str, torch.Tensor]]:
    """Times ``generate()`` (evaluation samples) and scores the samples: (run entry, figure panel)."""
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        samples = generate()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    metric = demo_data.sliced_wasserstein2(samples.float().cpu(), ds.halves()[0])
    entry = {"model": model_name, "sampler": sampler_name, "steps": steps, "nfe": nfe, "seconds": seconds,
             "metric": metric}
    return entry, (f"{model_name} {steps} step{'s' if steps > 1 else ''}", panel(ds, samples))


def evaluate_teacher(teacher: Denoiser, ds: demo_data.Dataset, config: Config, device: torch.device):
    labels = ds.eval_labels().to(device)
    noise = eval_noise(ds, device, config.seed)
    runs, panels = [], [("data", panel(ds, ds.halves()[0]))]
    for steps in (50, 4, 1):
        sampler = samplers.DDIMSampler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False,
                                       set_alpha_to_one=False)

        def generate():
            return samplers.sample(lambda x, t: teacher.model(x, t, class_labels=labels), noise, sampler,
                                   num_steps=steps)

        entry, pic = measure("teacher", "ddim", steps, steps, ds, generate, device)
        runs.append(entry)
        panels.append(pic)
    return runs, panels


# name -> distill(teacher, ds, config, device, log) -> (runs, panels); filled by the methods below.
METHODS: dict[str, Callable] = {}
