"""Input checks shared by every fewstep op wrapper.

Each failed check raises an exception that names the argument, what was expected and what
was given, so a bad call never reaches a kernel.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {list(t.shape)}")


def check_like(name: str, t: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must match ``ref`` in shape, dtype and device (skipped when ``t`` is None)."""
    if t is None:
        return
    check_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {list(ref.shape)} (the shape of {ref_name}), "
                         f"got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), "
                         f"got {t.device}")


def check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def check_index(name: str, index: int, length: int) -> None:
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"{name}: expected an int step index, got {type(index).__name__}")
    if not 0 <= index < length:
        raise IndexError(f"{name}: expected a step index in [0, {length}), got {index}")
