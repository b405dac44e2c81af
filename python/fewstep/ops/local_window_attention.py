"""``fewstep.local_window_attention``: CLEAR's local-window attention with text and extra tokens.

Semantics: :mod:`fewstep.reference.local_window_attention`. Backends:
``torch.ops.fewstep.local_window_attention`` (C++ CPU kernel, csrc/local_window_attention/),
``torch.ops.fewstep.local_window_attention_triton`` (python/fewstep/triton/local_window_attention.py,
the GPU backend) and the reference (dense masked attention, float32 math, float64 for float64).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fewstep import _C, _checks, _dispatch
from fewstep.ops.local_window_attention_checks import (check_backward_args, check_forward_args,
                                                       lse_dtype_for)
from fewstep.reference.local_window_attention import local_window_attention_reference

OP = "local_window_attention"


# Whether fewstep._C registers the C++ ops (an extension built before them does not).
_HAS_CPP_OPS = _C is not None and hasattr(torch.ops.fewstep, OP)


def _fake_forward(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w, scale):
    check_forward_args(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w, scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=lse_dtype_for(q.dtype))


def _fake_backward(grad_out, q, k, v, extra_k, extra_v, out, lse, grid_h, grid_w, n_text, radius, window_h,
                   window_w, scale):
    check_backward_args(grad_out, q, k, v, extra_k, extra_v, out, lse, grid_h, grid_w, n_text, radius, window_h,
                        window_w, scale)
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    no_extra = k.new_empty(k.shape[0], k.shape[1], 0, k.shape[3])
    return (like(q), like(k), like(v), like(extra_k) if extra_k is not None else no_extra,
            like(extra_v) if extra_v is not None else no_extra.clone())


def _setup_context(ctx, inputs, output):
    q, k, v, extra_k, extra_v, *pattern = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
    ctx.pattern = pattern  # grid_h, grid_w, n_text, radius, window_h, window_w, scale
    ctx.mark_non_differentiable(lse)  # lse is for inspection and merging; gradients flow through out


def _autograd_backward(backward_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        dq, dk, dv, dextra_k, dextra_v = backward_op(grad_out, q, k, v, extra_k, extra_v, out, lse, *ctx.pattern)
        has_extra = extra_k is not None
        return (dq, dk, dv, dextra_k if has_extra else None, dextra_v if has_extra else None) + (None,) * 7
    return backward


if _HAS_CPP_OPS:
    torch.library.register_fake(f"fewstep::{OP}")(_fake_forward)
    torch.library.register_fake(f"fewstep::{OP}_backward")(_fake_backward)
    torch.library.register_autograd(f"fewstep::{OP}", _autograd_backward(torch.ops.fewstep.local_window_attention_backward),
                                    setup_context=_setup_context)


def _pattern_args(q, grid, radius, window, n_text, scale) -> tuple[int, int, int, float, int, int, float]:
    """The public arguments in the compiled ops' encoding (see local_window_attention_checks)."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        raise TypeError(f"grid: expected (H, W), two ints, got {grid!r}")
    if (radius is None) == (window is None):
        raise ValueError(f"radius: expected exactly one of radius and window, got radius={radius!r}, "
                         f"window={window!r}")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window)):
            raise ValueError(f"window: expected (ry, rx), two ints >= 0, got {window!r}")
        radius_arg, window_h, window_w = 0.0, window[0], window[1]
    else:
        if isinstance(radius, bool) or not isinstance(radius, (int, float)):
            raise TypeError(f"radius: expected a number >= 1, got {type(radius).__name__}")
        radius_arg, window_h, window_w = float(radius), -1, -1
    if isinstance(n_text, bool) or not isinstance(n_text, int):
        raise TypeError(f"n_text: expected an int >= 0, got {type(n_text).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a number > 0 or None, got {type(scale).__name__}")
    return grid[0], grid[1], n_text, radius_arg, window_h, window_w, float(scale)


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int],
    radius: Optional[float] = None,
    window: Optional[tuple[int, int]] = None,
    n_text: int = 0,
    extra_k: Optional[torch.Tensor] = None,
    extra_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of ``[n_text text | H*W image tokens]`` where each image query sees the image keys
    within ``radius`` (strict circle) or ``window=(ry, rx)`` of it on the grid, every text key and
    the extra keys; text queries see every text and image key.

    q ``[B, heads, N, D]``; k, v ``[B, kv_heads, N, D]`` (query head h reads kv head
    ``h // (heads // kv_heads)``); extra_k, extra_v ``[B, kv_heads, E, D]``. Returns ``out`` like
    q, and with ``return_lse`` also the natural-log log-sum-exp ``[B, heads, N]`` (float32, float64
    for float64 inputs; not differentiable). Differentiable in q, k, v, extra_k and extra_v.
    """
    _checks.check_tensor("q", q)
    args = (q, k, v, extra_k, extra_v, *_pattern_args(q, grid, radius, window, n_text, scale))
    backend = _dispatch.select(OP, q.device, gpu_default="triton")
    if backend == "reference":
        check_forward_args(*args)
        out, lse = local_window_attention_reference(
            q, k, v, grid=tuple(grid), radius=radius, window=window, n_text=n_text, extra_k=extra_k,
            extra_v=extra_v, scale=args[-1], dtype=lse_dtype_for(q.dtype))
    elif backend == "triton":
        out, lse = (torch.ops.fewstep.local_window_attention_triton(*args) if torch.compiler.is_compiling()
                    else _TritonEager.apply(*args))
    elif backend == "cpu" and _HAS_CPP_OPS:
        out, lse = torch.ops.fewstep.local_window_attention(*args)
    else:
        raise _dispatch.BackendUnavailableError(
            f"fewstep.{OP}: backend {backend!r} is unavailable: "
            + ("fewstep._C was built without the local_window_attention ops (rebuild it)" if backend == "cpu"
               else "there is no CUDA C++ kernel of this op; its GPU backend is 'triton'"))
    return (out, lse) if return_lse else out


# torch.ops.fewstep.local_window_attention_triton(_backward) (Triton is imported on first launch):
# the same fakes, plus the Triton kernels' own limits (no float64, TMA-addressable head dims), and the same autograd.
from fewstep.triton import local_window_attention as _triton_lwa  # noqa: E402


def _fake_forward_triton(q, *args):
    _triton_lwa.check_triton_args(q)
    return _fake_forward(q, *args)


def _fake_backward_triton(grad_out, q, *args):
    _triton_lwa.check_triton_args(q)
    return _fake_backward(grad_out, q, *args)


_triton_eager_backward = _autograd_backward(_triton_lwa.backward)


class _TritonEager(torch.autograd.Function):
    """The triton backend in eager mode: the same launchers as the ops, called without the custom
    op's Python dispatch (argument defaults, redispatch, aliasing checks, its autograd wrapper),
    which cost more host time per forward + backward than the kernels' device time at the training
    shape (bench/results/*local_window_attention_host*). torch.compile traces the ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, *pattern):
        out, lse = _triton_lwa.forward(q, k, v, extra_k, extra_v, *pattern)
        _setup_context(ctx, (q, k, v, extra_k, extra_v, *pattern), (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels have no derivative
    def backward(ctx, grad_out, grad_lse):
        return _triton_eager_backward(ctx, grad_out, grad_lse)


_triton_lwa.local_window_attention_triton.register_fake(_fake_forward_triton)
_triton_lwa.local_window_attention_triton_backward.register_fake(_fake_backward_triton)
_triton_lwa.local_window_attention_triton.register_autograd(
    _autograd_backward(torch.ops.fewstep.local_window_attention_triton_backward), setup_context=_setup_context)
