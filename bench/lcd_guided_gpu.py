"""GPU benchmark of the LCD, LCM-LoRA and guided-distillation training steps on a class-conditional
diffusers UNet2DModel (4×32×32 latents, B=32, bf16 autocast), each against the same model passes
written out by hand (the teacher's conditional and unconditional forwards and the target's without
grad, one student forward + backward with a plain MSE, and for LCD the EMA as torch._foreach_lerp_).
The difference is what the method adds: the fused teacher step and loss heads, noise and w draws,
the w-embedding, timestep tables and the EMA."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

import fewstep
from common import gpu_median_ms
from fewstep.distill import LCD, GuidedDistillation, add_lora

BATCH, SHAPE, CLASSES = 32, (4, 32, 32), 10


class Labeled(nn.Module):
    """UNet2DModel with class labels; label ``CLASSES`` is the null (unconditional) class."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel
        self.unet = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(128, 256, 256), num_class_embeds=CLASSES + 1,
                                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

    def forward(self, x, t, label):
        return self.unet(x, t, class_labels=label).sample


def _passes(no_grad_calls: int, no_grad_model, grad_model, ema=None):
    """The model work of one step: forwards without grad, one forward + backward, the EMA."""
    x = torch.randn(BATCH, *SHAPE, device="cuda")
    t = torch.randint(0, 1000, (BATCH,), device="cuda")
    label = torch.randint(0, CLASSES, (BATCH,), device="cuda")
    grads = [p for p in grad_model.parameters() if p.requires_grad]

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                for _ in range(no_grad_calls):
                    no_grad_model(x, t, label)
            loss = F.mse_loss(grad_model(x, t, label).float(), x)
        loss.backward()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, grads, 0.05)
    return run


def _step(method, batch):
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = method.loss("student", batch, 0)
        loss.backward()
        method.after_step("student", 0)
    return run


def run(rec):
    try:
        torch.manual_seed(0)
        teacher_net = Labeled().cuda().requires_grad_(False)
    except ImportError as e:
        print(f"lcd_guided: diffusers not available ({e}); skipped", flush=True)
        return
    teacher = fewstep.Denoiser(teacher_net, "eps", fewstep.VPSchedule())
    null = {"label": torch.full((BATCH,), CLASSES, device="cuda")}
    batch = {"x0": torch.randn(BATCH, *SHAPE, device="cuda"),
             "cond": {"label": torch.randint(0, CLASSES, (BATCH,), device="cuda")}}
    case = f"UNet2DModel {sum(p.numel() for p in teacher_net.parameters()) / 1e6:.0f}M, B={BATCH}, 4x32x32"

    lcd = LCD(teacher, w_min=1.0, w_max=7.0, null_cond=null)  # student: a copy of the teacher
    lora_net = add_lora(copy.deepcopy(teacher_net), rank=64)
    lcm_lora = LCD(fewstep.Denoiser(lora_net, "eps", teacher.schedule), lora_net, w_min=1.0, w_max=7.0,
                   null_cond=null, target="self")
    guided = GuidedDistillation(teacher, w_min=2.0, w_max=2.0, null_cond=null, num_steps=16)
    progressive = copy.deepcopy(guided)
    progressive.next_round()
    student = lcd.student.model
    ema = [p.detach().clone() for p in student.parameters()]
    cases = (("LCD step (CFG, EMA target)", _step(lcd, batch), _passes(3, teacher_net, student, ema)),
             ("LCM-LoRA step (r=64)", _step(lcm_lora, batch), _passes(3, lora_net, lora_net)),
             ("guided stage 1 step", _step(guided, batch), _passes(2, teacher_net, guided.student.model)),
             ("progressive round step", _step(progressive, batch),
              _passes(2, progressive.progressive_teacher.model, progressive.student.model)))
    for name, method_step, model_passes in cases:
        floor = gpu_median_ms(model_passes)
        ms = gpu_median_ms(method_step)
        rec.add("lcd_guided", case, f"{name}: model passes", torch.bfloat16, floor)
        rec.add("lcd_guided", case, f"{name}: fewstep", torch.bfloat16, ms, "overhead_pct", 100 * (ms - floor) / floor)
    del lcd, lcm_lora, guided, progressive, teacher_net
    torch.cuda.empty_cache()
