"""Which backend runs an op: one place decides, users can force one.

Backends: ``cpu`` (C++ kernels in ``fewstep._C``), ``cuda`` (CUDA C++ in ``fewstep._C``),
``triton`` (Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``) and
``reference`` (the op's unfused eager-PyTorch reference, always available, slow). ``auto`` picks the compiled kernel
for the tensor's device, or the op's preferred GPU backend.

Force one with ``with fewstep.backend("triton"): ...`` or ``FEWSTEP_BACKEND=triton``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fewstep_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {list(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the backend of every fewstep op called inside the block."""
    token = _forced.set(_validate(name, "fewstep.backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> str:
    forced = _forced.get()
    if forced is not None:
        return forced
    return _validate(os.environ.get("FEWSTEP_BACKEND", "auto"), "FEWSTEP_BACKEND")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _compiled_status() -> tuple[Optional[str], bool]:
    """(why fewstep._C is unusable or None, whether it has CUDA kernels); fixed for the process."""
    from fewstep import _C, _C_error
    if _C is None:
        return f"the compiled extension fewstep._C failed to load: {_C_error}", False
    return None, bool(_C.build_info()["cuda"])


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got tensors on {device}"
        return _compiled_status()[0]
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got tensors on {device}"
        load_error, has_cuda = _compiled_status()
        if load_error is not None:
            return load_error
        if not has_cuda:
            return ("fewstep._C was built without CUDA (rebuild with FEWSTEP_CUDA=1 against a CUDA "
                    "build of torch with nvcc on PATH)")
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreted():
            return None
        return (f"the 'triton' backend runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"got tensors on {device}")
    raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")


# Evaluated while tracing and baked into the graph: a compiled function keeps the backend that
# was in force when it was compiled.
@torch.compiler.assume_constant_result
def select(op: str, device: torch.device, gpu_default: str = "cuda", has_triton: bool = True) -> str:
    """The backend that runs ``op`` on ``device``; raises if a forced one cannot.

    An op without a Triton kernel (``has_triton=False``) runs its compiled kernel, or else the
    reference, where Triton is asked for or is the only GPU backend."""
    name = requested_backend()
    compiled = "cuda" if device.type == "cuda" else "cpu"
    gpu_fallback = "triton" if has_triton else "reference"
    if name == "triton" and not has_triton:
        return compiled if unavailable_reason(compiled, device) is None else "reference"
    if name == "auto":
        name = gpu_default if device.type == "cuda" else "cpu"
        if unavailable_reason(name, device) is None:
            return name
        if device.type == "cuda" and unavailable_reason(gpu_fallback, device) is None:
            return gpu_fallback
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"fewstep.{op}: backend {name!r} is unavailable: {reason}")
    return name
