"""Python mirror of the distillation losses' C++ checks (csrc/distill_losses/distill_losses.cpp):
the same messages, used by the fake implementations and the reference backend."""
from __future__ import annotations

from typing import Optional, Union

import torch

from fewstep._checks import check_finite, check_like, check_tensor
from fewstep.reference.distill_losses import LCD_LOSSES, PREDICTIONS

MAX_BATCH = 65535  # the CUDA grid's y size


def check_batch(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name}: expected a batch of samples [B, ...], got shape {list(t.shape)}")
    if t.shape[0] > MAX_BATCH:
        raise ValueError(f"{name}: expected at most {MAX_BATCH} samples (the CUDA grid's y size), "
                         f"got shape {list(t.shape)}")


def check_positive(name: str, value: float) -> None:
    check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_per_sample(name: str, t: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor,
                     dtypes: tuple[torch.dtype, ...], what: str) -> None:
    """A [B] vector of ``dtypes`` on ref's device, one entry per sample of ``ref``."""
    if t is None:
        return
    check_tensor(name, t, dtypes=dtypes)
    if t.shape != (ref.shape[0],):
        raise ValueError(f"{name}: expected shape [{ref.shape[0]}] ({what} per sample of {ref_name}), "
                         f"got {list(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def check_table(alphas_cumprod: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor("alphas_cumprod", alphas_cumprod)
    if alphas_cumprod.dim() != 1:
        raise ValueError(f"alphas_cumprod: expected a 1-D table indexed by timestep, got shape "
                         f"{list(alphas_cumprod.shape)}")
    if alphas_cumprod.device != ref.device:
        raise ValueError(f"alphas_cumprod: expected device {ref.device} (the device of {ref_name}), "
                         f"got {alphas_cumprod.device}")


def check_pseudo_huber(pred, target, c) -> None:
    check_tensor("pred", pred)
    check_like("target", target, "pred", pred)
    check_positive("c", c)


def check_denoising(pred, target, weight) -> None:
    check_batch("pred", pred)
    check_like("target", target, "pred", pred)
    check_per_sample("weight", weight, "pred", pred, (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                     "one weight")


def check_timesteps(x_name, x, t, t_prev, alphas_cumprod, prediction) -> None:
    check_per_sample("t", t, x_name, x, (torch.int64,), "one timestep")
    check_per_sample("t_prev", t_prev, x_name, x, (torch.int64,), "one timestep")
    check_table(alphas_cumprod, x_name, x)
    check_choice("prediction", prediction, PREDICTIONS)


def check_lcd_teacher_step(x_t, cond_out, uncond_out, t, t_prev, guidance_scale: Union[float, torch.Tensor],
                           alphas_cumprod, prediction) -> None:
    check_batch("x_t", x_t)
    check_like("cond_out", cond_out, "x_t", x_t)
    check_like("uncond_out", uncond_out, "x_t", x_t)
    if isinstance(guidance_scale, torch.Tensor):
        check_per_sample("guidance_scale", guidance_scale, "x_t", x_t,
                         (torch.float16, torch.bfloat16, torch.float32, torch.float64), "one scale")
    else:
        check_finite("guidance_scale", guidance_scale)
    check_timesteps("x_t", x_t, t, t_prev, alphas_cumprod, prediction)


def check_lcd(student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod, prediction, loss, huber_c,
              sigma_data, timestep_scaling) -> None:
    check_batch("student_out", student_out)
    check_like("x_t", x_t, "student_out", student_out)
    check_like("target_out", target_out, "student_out", student_out)
    check_like("x_prev", x_prev, "student_out", student_out)
    check_timesteps("student_out", student_out, t, t_prev, alphas_cumprod, prediction)
    check_choice("loss", loss, LCD_LOSSES)
    check_positive("huber_c", huber_c)
    check_positive("sigma_data", sigma_data)
    check_finite("timestep_scaling", timestep_scaling)


def check_gan(real_logits: Optional[torch.Tensor], fake_logits) -> None:
    """Generator loss when ``real_logits`` is None, discriminator loss otherwise."""
    check_tensor("fake_logits", fake_logits)
    if real_logits is None:
        return
    check_tensor("real_logits", real_logits)
    if real_logits.dtype != fake_logits.dtype:
        raise TypeError(f"real_logits: expected dtype {fake_logits.dtype} (the dtype of fake_logits), "
                        f"got {real_logits.dtype}")
    if real_logits.device != fake_logits.device:
        raise ValueError(f"real_logits: expected device {fake_logits.device} (the device of fake_logits), "
                         f"got {real_logits.device}")

