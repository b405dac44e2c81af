"""GPU benchmark of the distillation loss heads besides DMD, forward + backward, at SD1.5
(32x4x64x64), SDXL (2x4x128x128) and Wan-480p (1x16x21x60x104) latent shapes: the eager PyTorch a
training script writes (diffusers' LCM distillation script for LCD), torch.compile of the same
math, and fewstep.losses. Times: eager calls (host included) and the same step replayed as a CUDA
graph (device time)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fewstep
from common import gpu_median_ms, graph_replay_ms

SHAPES = {"sd15 32x4x64x64": (32, 4, 64, 64), "sdxl 2x4x128x128": (2, 4, 128, 128),
          "wan480p 1x16x21x60x104": (1, 16, 21, 60, 104)}


def _bc(v, like):
    return v.view((-1,) + (1,) * (like.dim() - 1))


def _x0_eps(out, x, alphas):  # eps prediction, as the LCM script's get_predicted_original_sample
    a = _bc(alphas, x)
    return (x - (1 - a).sqrt() * out) / a.sqrt(), out


def _scalings(t, sigma_data=0.5, timestep_scaling=10.0):  # the script's scalings_for_boundary_conditions
    st = timestep_scaling * t
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2) ** 0.5


def eager_lcd(student, x_t, t, cond, uncond, target_out, t_prev, w, table):
    """The LCM script's head: CFG-augmented DDIM step, boundary scalings, pseudo-Huber loss."""
    with torch.no_grad():
        a_t = table[t]
        x0_c, eps_c = _x0_eps(cond, x_t, a_t)
        x0_u, eps_u = _x0_eps(uncond, x_t, a_t)
        x0_w, eps_w = x0_c + _bc(w, x_t) * (x0_c - x0_u), eps_c + _bc(w, x_t) * (eps_c - eps_u)
        a_prev = _bc(table[t_prev], x_t)
        x_prev = a_prev.sqrt() * x0_w + (1 - a_prev).sqrt() * eps_w
        c_skip, c_out = _scalings(t_prev)
        target = _bc(c_skip, x_t) * x_prev + _bc(c_out, x_t) * _x0_eps(target_out, x_prev, table[t_prev])[0]
    c_skip_s, c_out_s = _scalings(t)
    pred = _bc(c_skip_s, x_t) * x_t + _bc(c_out_s, x_t) * _x0_eps(student, x_t, a_t)[0]
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + 0.001**2) - 0.001)


def fused_lcd(student, x_t, t, cond, uncond, target_out, t_prev, w, table):
    with torch.no_grad():
        x_prev = fewstep.losses.lcd_teacher_step(x_t, cond, uncond, t, t_prev, w, table)
    return fewstep.losses.lcd(student, x_t, t, target_out, x_prev, t_prev, table)


def eager_pseudo_huber(pred, target):
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + 0.001**2) - 0.001)


def eager_denoising(pred, target, weight):
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (weight * per_sample).mean()


def eager_gan(real_logits, fake_logits):
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def _time(rec, suite, case, dtype, provider, fn, leaves):
    def step():
        fn().backward()
        for leaf in leaves:
            leaf.grad = None

    rec.add(suite, case, provider, dtype, gpu_median_ms(step))

    def graphed():
        for leaf in leaves:
            leaf.grad = None
        fn().backward()

    try:
        rec.add(suite, case, provider + " (CUDA graph)", dtype, graph_replay_ms(graphed))
    except RuntimeError as e:  # a provider that cannot be captured is reported, not timed
        print(f"{suite}: {provider} {case}: no CUDA graph: {str(e).splitlines()[0]}", flush=True)
    for leaf in leaves:
        leaf.grad = None


def run(rec):
    table = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device="cuda") ** 2, 0)
    heads = {
        "lcd": (eager_lcd, fused_lcd),
        "pseudo_huber": (eager_pseudo_huber, fewstep.losses.pseudo_huber),
        "denoising": (eager_denoising, fewstep.losses.denoising),
        "gan_discriminator": (eager_gan, fewstep.losses.gan_discriminator),
    }
    compiled = {name: torch.compile(eager, fullgraph=True) for name, (eager, _) in heads.items()}
    for case, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            batch = shape[0]
            gen = torch.Generator(device="cuda").manual_seed(0)
            pred = torch.randn(shape, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
            others = [torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]
            fake_logits = torch.randn(shape, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
            t = torch.randint(20, 1000, (batch,), device="cuda", generator=gen)
            w = torch.rand(batch, device="cuda", generator=gen) * 10 + 5
            args = {
                "lcd": (pred, others[0], t, others[1], others[2], others[3], t - 20, w, table),
                "pseudo_huber": (pred, others[0]),
                "denoising": (pred, others[0], w),
                "gan_discriminator": (pred, fake_logits),  # a patch discriminator's logits map
            }
            for name, (eager, fused) in heads.items():
                a = args[name]
                leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
                for provider, fn in (("eager", eager), ("torch.compile", compiled[name]), ("fewstep", fused)):
                    _time(rec, "distill_losses", f"{name} {case}", dtype, provider, lambda: fn(*a), leaves)
            del pred, others, fake_logits
            torch.cuda.empty_cache()
