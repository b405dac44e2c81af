"""Input checks shared by every fewstep op wrapper.

Each failed check raises an exception that names the argument, what was expected and what
was given, so a bad call never reaches a kernel.
"""
from __future__ import annotations

import decimal
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


def number_repr(value: float) -> str:
    """``value`` spelled as the C++ checks spell it (``double_repr`` in csrc/fewstep/checks.h, that is
    std::to_chars: the shortest round-trip digits, fixed or scientific, whichever is shorter), so
    that a Python check and its C++ twin print the same message ("1" for 1.0, "1e-05", "inf")."""
    value = float(value)
    if not math.isfinite(value):
        return repr(value)
    sign, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    digits = "".join(map(str, digits))
    point = len(digits) + exponent  # position of the decimal point after the first digits
    if exponent >= 0:
        fixed = digits + "0" * exponent
    elif point > 0:
        fixed = digits[:point] + "." + digits[point:]
    else:
        fixed = "0." + "0" * -point + digits
    power = point - 1
    scientific = (digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
                  + f"e{'+' if power >= 0 else '-'}{abs(power):02d}")
    return ("-" if sign else "") + (fixed if len(fixed) <= len(scientific) else scientific)
