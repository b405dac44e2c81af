"""Launching compiled kernels without ``JITFunction.run``'s per-call work (the local-window
attention kernels on Hopper: the Gluon ones and the backward's delta kernel).

An eager local-window attention step at CLEAR's training shape spent more time on the host than on
the GPU (docs/attention.md, "Host time"): every launch bound and specialised ~30 arguments again and
every host tensor descriptor was a validated dataclass (8 us each, 30 per step). Here the first
launch of a kernel with a given specialisation goes through Triton as usual (it compiles, and
Triton validates real Gluon ``TensorDescriptor``s); later ones call the compiled kernel's launcher
directly, descriptors as :class:`HostDescriptor`s, which carry just what that launcher reads (base
address, shape, strides, padding) to build the TMA descriptors.

The cache key holds everything Triton specialises these kernels on: the constexprs and warps, the
block shape and dtype of each descriptor (its shared-memory layout follows from them), ``None`` for
compiled-out arguments, dtype and 16-byte alignment of pointer arguments, and the value of integers
the kernel does specialise (all of the local-window kernels' integers are ``do_not_specialize``).
Written against Triton 3.6's launcher (``GLUON_TRITON_VERSIONS`` gates the Gluon kernels); while a
launch hook is installed (a profiler such as proton) every launch takes Triton's own path.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch


class HostDescriptor:
    """A TMA descriptor's host arguments, ``offset`` elements into contiguous ``tensor``."""
    __slots__ = ("tensor", "offset", "shape", "strides", "block")
    padding = "zero"  # what Triton's launcher reads besides base, shape and strides

    def __init__(self, tensor: torch.Tensor, offset: int, shape: list, strides: list, block: list):
        self.tensor, self.offset, self.shape, self.strides, self.block = tensor, offset, shape, strides, block

    @property
    def base(self) -> "HostDescriptor":  # the launcher calls base.data_ptr()
        return self

    def data_ptr(self) -> int:
        return self.tensor.data_ptr() + self.offset * self.tensor.element_size()

    def specialization(self) -> tuple:
        return (self.tensor.dtype, tuple(self.block))

    def descriptor(self):
        """The validated Gluon descriptor, for launches through Triton's JIT."""
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        return TensorDescriptor(self.tensor.view(-1)[self.offset:], self.shape, self.strides, self.block,
                                _block_layout(tuple(self.block), self.tensor.dtype))


@functools.cache
def _block_layout(block: tuple, dtype: torch.dtype):
    """The swizzled shared-memory layout of a descriptor's blocks (cached: building it costs more
    host time than the descriptor itself)."""
    from triton.experimental.gluon import language as gl
    element = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


@functools.cache
def _runtime_params(kernel) -> frozenset:
    """Indices of the kernel's parameters Triton does not specialise on their value."""
    return frozenset(p.num for p in kernel.params if p.do_not_specialize)


def _arg_key(index: int, arg: Any, runtime: frozenset) -> Any:
    kind = type(arg)
    if kind is int:
        return "i" if index in runtime else arg
    if kind is HostDescriptor:
        return arg.specialization()
    if kind is float:
        return "f"
    if arg is None or kind is bool:
        return arg
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    raise TypeError(f"argument {index}: no launch key for {kind.__name__}")


_compiled: dict = {}


def cached_kernels() -> int:
    """How many specialisations launch directly (tests check the direct path ran)."""
    return len(_compiled)


def _hooks_installed() -> bool:
    """Whether a launch hook is installed (Triton 3.6 keeps them in HookChains, empty by default)."""
    from triton import knobs
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(getattr(hook, "calls", hook is not None) for hook in hooks)


def launch_through_jit(kernel, programs: int, args: tuple, constexprs: dict, num_warps: int):
    """The same launch through Triton's JIT, descriptors validated (every first launch; the
    reference the direct path is tested and benchmarked against). Returns the compiled kernel."""
    real = [a.descriptor() if isinstance(a, HostDescriptor) else a for a in args]
    return kernel[(programs,)](*real, **constexprs, num_warps=num_warps)


def launch(kernel, programs: int, args: tuple, constexprs: dict, num_warps: int) -> None:
    """Launches ``kernel`` (Gluon or Triton) over a 1-D grid of ``programs``: ``args`` are its
    leading parameters (descriptors as :class:`HostDescriptor`), ``constexprs`` the trailing ones."""
    device = torch.cuda.current_device()
    runtime = _runtime_params(kernel)
    key = (kernel, device, num_warps, *constexprs.items(), *[_arg_key(i, a, runtime) for i, a in enumerate(args)])
    compiled: Optional[Any] = _compiled.get(key)
    if compiled is None or _hooks_installed():
        names = kernel.arg_names[len(args):]
        if list(names) != list(constexprs):
            raise TypeError(f"{kernel.__name__}: expected the trailing parameters {names} as constexprs, "
                            f"got {list(constexprs)}")
        compiled = launch_through_jit(kernel, programs, args, constexprs, num_warps)
        if not _hooks_installed():
            _compiled[key] = compiled
        return
    stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's launch path passes
    run = compiled.run  # loads the module on first use
    # no launch metadata and no hooks (none is installed): the launcher skips them
    run(programs, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
        *constexprs.values())
