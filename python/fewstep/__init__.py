"""fewstep: few-step diffusion — distillation methods on hand-written kernels."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension that links it)

try:
    from fewstep import _C  # loading it registers torch.ops.fewstep.*
    _C_error = None
except ImportError as e:  # reported by the dispatcher when a compiled backend is asked for
    _C = None
    _C_error = f"{type(e).__name__}: {e}"

from fewstep._dispatch import BACKENDS, BackendUnavailableError, backend
from fewstep import attention, finetune, losses, ops, optim, samplers
from fewstep.ops.ema import ema_update_
from fewstep.ops.local_window_attention import local_window_attention
from fewstep.denoiser import Denoiser, FlowSchedule, Prediction, VPSchedule
from fewstep import train  # after ema_update_, which the trainer calls

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "Denoiser", "FlowSchedule", "Prediction", "VPSchedule", "attention", "backend", "build_info", "ema_update_", "finetune", "local_window_attention", "losses", "ops", "optim", "samplers", "train"]


def build_info() -> dict:
    """How fewstep._C was built (torch version, CUDA, archs, compiler), or why it is missing."""
    if _C is None:
        return {"error": _C_error}
    return dict(_C.build_info())
