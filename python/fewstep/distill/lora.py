"""LoRA adapters through PEFT, for LCM-LoRA: the student is the teacher's own network plus
low-rank adapters, and only the adapters train.

    add_lora(unet, rank=64)                  # in place; base weights frozen
    teacher = fewstep.Denoiser(unet)         # the same module: LCD runs it with adapters off
    method = fewstep.distill.LCD(teacher, unet, target="self")
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

from torch import nn

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _peft():
    try:
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:
        raise ImportError("LoRA mode needs peft: pip install peft") from e
    return peft, BaseTunerLayer


def add_lora(model: nn.Module, rank: int = 64, target_modules: Optional[Sequence[str]] = None,
             alpha: Optional[float] = None, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters (rank ``rank``, scale ``alpha / rank``, alpha defaulting to the rank as in
    LCM-LoRA) into ``model`` in place and freeze everything else; returns ``model``.

    ``target_modules``: module names or name suffixes as PEFT takes them (for a diffusers UNet, e.g.
    ``["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj"]``); default: every Linear and Conv layer."""
    peft, _ = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected an int >= 1, got {rank!r}")
    if target_modules is None:
        target_modules = [name for name, m in model.named_modules() if isinstance(m, ADAPTABLE)]
        if not target_modules:
            raise ValueError(f"model: expected Linear or Conv layers to adapt, found none in {type(model).__name__}")
    config = peft.LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=list(target_modules))
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    try:
        _, base_layer = _peft()
    except ImportError:
        return False
    return any(isinstance(m, base_layer) for m in model.modules())


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base network (the teacher of LCM-LoRA): adapters off, then back on."""
    _, base_layer = _peft()
    layers = [m for m in model.modules() if isinstance(m, base_layer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
