"""Argument checks of ``fewstep::local_window_attention`` and its backward in Python, shared by
the fake implementations, the Triton ops and the reference backend. The C++ glue
(csrc/local_window_attention/) makes the same checks with the same messages.

Pattern encoding of the compiled ops: a circle when ``radius > 0`` and
``window_h == window_w == -1``; a rectangle when ``radius == 0`` and ``window_h, window_w >= 0``.
"""
from __future__ import annotations

import math

import torch

from fewstep import _checks


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_4d(name: str, t: torch.Tensor, what: str) -> None:
    _checks.check_tensor(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor {what}, got shape {_shape(t)}")


def _check_same_dtype_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")


def check_forward_args(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w,
                       scale) -> None:
    """The checks of ``fewstep::local_window_attention``'s arguments (schema order)."""
    _check_4d("q", q, "[B, heads, N, D]")
    batch, heads, n, d = q.shape
    _check_4d("k", k, "[B, kv_heads, N, D]")
    _check_same_dtype_device("k", k, q)
    kv_heads = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, n, d):
        raise ValueError(f"k: expected shape [{batch}, kv_heads, {n}, {d}] (B, N and D of q), got {_shape(k)}")
    if heads % kv_heads != 0:
        raise ValueError(f"k: expected kv_heads (dim 1) dividing the {heads} heads of q, got {kv_heads}")
    _checks.check_like("v", v, "k", k)
    if (extra_k is None) != (extra_v is None):
        missing, given = ("extra_v", "extra_k") if extra_v is None else ("extra_k", "extra_v")
        raise ValueError(f"{missing}: expected a tensor because {given} is given, got None")
    if extra_k is not None:
        _check_4d("extra_k", extra_k, "[B, kv_heads, E, D]")
        _check_same_dtype_device("extra_k", extra_k, q)
        if (extra_k.shape[0], extra_k.shape[1], extra_k.shape[3]) != (batch, kv_heads, d):
            raise ValueError(f"extra_k: expected shape [{batch}, {kv_heads}, E, {d}] (B, kv_heads and D of k), "
                             f"got {_shape(extra_k)}")
        _checks.check_like("extra_v", extra_v, "extra_k", extra_k)
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    if n_text < 0:
        raise ValueError(f"n_text: expected >= 0, got {n_text}")
    if n != n_text + grid_h * grid_w:
        raise ValueError(f"q: expected N (dim 2) = n_text + grid_h * grid_w = {n_text} + {grid_h} * {grid_w} = "
                         f"{n_text + grid_h * grid_w}, got {n}")
    if window_h == -1 and window_w == -1:
        if not (math.isfinite(radius) and radius >= 1):
            raise ValueError(f"radius: expected a finite number >= 1 (or 0 with a window), got "
                             f"{_checks.number_repr(radius)}")
    else:
        if radius != 0:
            raise ValueError(f"radius: expected 0 with a window (window_h, window_w >= 0), got "
                             f"{_checks.number_repr(radius)}")
        for name, value in (("window_h", window_h), ("window_w", window_w)):
            if value < 0:
                raise ValueError(f"{name}: expected >= 0 (or -1 with both, for a circle), got {value}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite number > 0, got {_checks.number_repr(scale)}")


def check_backward_args(grad_out, q, k, v, extra_k, extra_v, out, lse, grid_h, grid_w, n_text, radius,
                        window_h, window_w, scale) -> None:
    """The checks of ``fewstep::local_window_attention_backward``'s arguments (schema order)."""
    check_forward_args(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w, scale)
    _checks.check_like("grad_out", grad_out, "q", q)
    _checks.check_like("out", out, "q", q)
    lse_dtype = lse_dtype_for(q.dtype)
    _checks.check_tensor("lse", lse, dtypes=(lse_dtype,))
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse: expected shape {_shape(q)[:3]} ([B, heads, N] of q), got {_shape(lse)}")
    if lse.device != q.device:
        raise ValueError(f"lse: expected device {q.device} (the device of q), got {lse.device}")


def lse_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp's dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
