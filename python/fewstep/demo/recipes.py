"""How the demo trains its teacher and distills it: one function per method, settings per dataset."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from fewstep import samplers
from fewstep.demo import data as demo_data
from fewstep.demo import figure
from fewstep.demo.models import SCHEDULE, train_teacher as _train_teacher, with_cond_input
from fewstep.denoiser import Denoiser
from fewstep.distill import BOOT, DMD2, LCD, GuidedDistillation
from fewstep.train import Trainer


@dataclasses.dataclass
class Config:
    teacher_steps: int
    hidden: int
    depth: int
    distill_steps: int
    dmd2_steps: int  # generator steps are a fifth of these (two time-scale update)
    dmd2_batch_size: int
    batch_size: int
    seed: int = 0


def config_for(name: str, quick: bool = False, seed: int = 0) -> Config:
    if quick:
        return Config(teacher_steps=60, hidden=64, depth=2, distill_steps=20, dmd2_steps=20, dmd2_batch_size=128, batch_size=128, seed=seed)
    if name == "mixture2d":
        return Config(teacher_steps=2500, hidden=128, depth=4, distill_steps=1000, dmd2_steps=2500, dmd2_batch_size=512, batch_size=256, seed=seed)
    return Config(teacher_steps=3000, hidden=256, depth=4, distill_steps=1000, dmd2_steps=1500, dmd2_batch_size=256, batch_size=256, seed=seed)


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
        sampler = samplers.DDIMSampler(**SCHEDULE, prediction_type="v_prediction", timestep_spacing="trailing",
                                       clip_sample=False, set_alpha_to_one=False)

        def generate():
            return samplers.sample(lambda x, t: teacher.model(x, t, class_labels=labels), noise, sampler,
                                   num_steps=steps)

        entry, pic = measure("teacher", "ddim", steps, steps, ds, generate, device)
        runs.append(entry)
        panels.append(pic)
    return runs, panels


NULL_COND = {"class_labels": None}  # the teacher's null class: CFG's unconditional branch


def batches(ds: demo_data.Dataset, batch_size: int, device: torch.device):
    """The Trainer's data callable: a random training batch with its class labels."""
    x_all, y_all = ds.train_x.to(device), ds.train_y.to(device)

    def draw(index: int, generator: torch.Generator) -> dict:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=generator, device=device)
        return {"x0": x_all[idx], "cond": {"class_labels": y_all[idx]}}
    return draw


def train(method, ds: demo_data.Dataset, config: Config, device: torch.device, log, *, steps: int, lr,
          ema=None, batch_size=None) -> Trainer:
    data = batches(ds, batch_size or config.batch_size, device)
    trainer = Trainer(method, data, max_steps=steps, lr=lr, mixed_precision="no",
                      clip_grad_norm=1.0, ema=ema, log_every=max(1, steps // 4), progress=False,
                      parallel="none", device=device, seed=config.seed)
    return trainer.train()


def evaluate(method, model_name: str, sampler_name: str, steps_list, nfe_per_step: int,
             ds: demo_data.Dataset, config: Config, device: torch.device, **sample_kwargs):
    labels = ds.eval_labels().to(device)
    noise = eval_noise(ds, device, config.seed)
    runs, panels = [], []
    for steps in steps_list:
        entry, pic = measure(model_name, sampler_name, steps, steps * nfe_per_step, ds,
                             lambda: method.sample(noise, steps, class_labels=labels, **sample_kwargs), device)
        runs.append(entry)
        panels.append(pic)
    return runs, panels


def distill_lcd(teacher: Denoiser, ds: demo_data.Dataset, config: Config, device: torch.device, log):
    """LCD without guidance (w = 0: the metric asks for the data distribution), EMA target."""
    method = LCD(teacher, w_min=0.0, w_max=0.0, null_cond=NULL_COND, num_ddim_timesteps=50, skip=1,
                 target="ema", ema_decay=0.95, loss="huber", huber_c=1e-3).to(device)
    train(method, ds, config, device, log, steps=config.distill_steps, lr=3e-4)
    return evaluate(method, "lcd", "lcm", (1, 2, 4), 1, ds, config, device)


def distill_dmd2(teacher: Denoiser, ds: demo_data.Dataset, config: Config, device: torch.device, log):
    """One-step DMD2: generator and fake score start as copies of the teacher; two time-scale
    updates; DMD2's GAN head on the fake score's last hidden features, fed with real data."""
    hidden = config.hidden
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
    method = DMD2(teacher, guidance_scale=1.0, num_steps=1, dfake_gen_update_ratio=5, gan_head=head,
                  gan_feature_layer=f"blocks.{config.depth - 1}", gan_generator_weight=0.05,
                  gan_discriminator_weight=0.1).to(device)
    trainer = train(method, ds, config, device, log, steps=config.dmd2_steps, lr=1e-3,
                    batch_size=config.dmd2_batch_size, ema={"generator": (method.generator, 0.95)})
    # Sample with the EMA generator (the EMA holds its parameters; it has no buffers to miss).
    method.generator.load_state_dict(trainer.ema_state_dict("generator"), strict=True)
    return evaluate(method, "dmd2", "one-step", (1,), 1, ds, config, device)


def distill_boot(teacher: Denoiser, ds: demo_data.Dataset, config: Config, device: torch.device, log):
    """Data-free BOOT: the student learns the teacher's DDIM path from noise alone."""
    method = BOOT(teacher, null_cond=NULL_COND, num_intervals=32).to(device)
    train(method, ds, config, device, log, steps=config.distill_steps, lr=1e-4)
    return evaluate(method, "boot", "one-step", (1,), 1, ds, config, device)


def distill_guided(teacher: Denoiser, ds: demo_data.Dataset, config: Config, device: torch.device, log):
    """Guided distillation: stage 1 (w-conditioned student), then progressive rounds 8 -> 4 -> 2."""
    method = GuidedDistillation(teacher, with_cond_input(teacher.model, 32), w_min=0.0, w_max=2.0,
                                null_cond=NULL_COND, w_embedding=32, num_steps=8).to(device)
    train(method, ds, config, device, log, steps=config.distill_steps // 2, lr=3e-4)
    for _ in range(2):
        method.next_round()
        train(method, ds, config, device, log, steps=config.distill_steps // 4, lr=3e-4)
    return evaluate(method, "guided", "ddim", (2,), 1, ds, config, device, w=0.0)


# name -> distill(teacher, ds, config, device, log) -> (runs, panels)
METHODS: dict[str, Callable] = {"lcd": distill_lcd, "dmd2": distill_dmd2, "boot": distill_boot,
                                "guided": distill_guided}
