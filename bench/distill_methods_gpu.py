"""GPU benchmark of the DMD2 and BOOT training steps on a diffusers UNet2DModel (4×32×32 latents,
B=32, bf16 autocast): each phase's loss + backward, against the same model passes written out by
hand (forwards without grad, one forward + backward with grad, a plain MSE in place of the method's
loss). The difference is what the method adds: its loss heads, noise draws, timestep tables and
schedule arithmetic."""
from __future__ import annotations

import torch
from torch.nn import functional as F

import fewstep
from common import gpu_median_ms
from fewstep.distill import BOOT, DMD2

BATCH, SHAPE = 32, (4, 32, 32)


def _unet():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(128, 256, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).cuda()


def _passes(no_grad_models, grad_model):
    """The model work of one phase: forwards without grad, then one forward + backward."""
    x = torch.randn(BATCH, *SHAPE, device="cuda")
    t = torch.randint(0, 1000, (BATCH,), device="cuda")

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                for model in no_grad_models:
                    model(x, t)
            loss = F.mse_loss(grad_model(x, t).sample.float(), x)
        loss.backward()
    return run


def _phase(method, phase, batch):
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = method.loss(phase, batch, 0)
        loss.backward()
    return run


def run(rec):
    try:
        torch.manual_seed(0)
        teacher_net = _unet().requires_grad_(False)
    except ImportError as e:
        print(f"distill_methods: diffusers not available ({e}); skipped", flush=True)
        return
    teacher = fewstep.Denoiser(teacher_net, "eps", fewstep.VPSchedule())
    batch = {"noise": torch.randn(BATCH, *SHAPE, device="cuda")}
    case = f"UNet2DModel {sum(p.numel() for p in teacher_net.parameters()) / 1e6:.0f}M, B={BATCH}, 4x32x32"

    dmd = DMD2(teacher)  # generator and fake score: copies of the teacher
    gen, fake = dmd.generator.model, dmd.fake_score.model
    boot = BOOT(teacher, fewstep.Denoiser(_unet(), "x0", teacher.schedule)).cuda()
    cases = (("DMD2 generator phase", _phase(dmd, "generator", batch), _passes([teacher_net, fake], gen)),
             ("DMD2 critic phase", _phase(dmd, "critic", batch), _passes([gen], fake)),
             ("BOOT step", _phase(boot, "student", batch), _passes([boot.student.model, teacher_net],
                                                                     boot.student.model)))
    for name, method_step, model_passes in cases:
        floor = gpu_median_ms(model_passes)
        ms = gpu_median_ms(method_step)
        rec.add("distill_methods", case, f"{name}: model passes", torch.bfloat16, floor)
        rec.add("distill_methods", case, f"{name}: fewstep", torch.bfloat16, ms, "overhead_pct",
                100 * (ms - floor) / floor)
    del dmd, boot, teacher_net
    torch.cuda.empty_cache()
