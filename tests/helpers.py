"""Test helpers: error bounds tied to the dtype, poisoned allocations, backend lists."""
from __future__ import annotations

import importlib.util
import os

import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, same_op_in_dtype: torch.Tensor, what: str):
    """Kernel error must be at most 2x the error of the same computation done by PyTorch in the
    input dtype, plus one machine epsilon for when PyTorch's result happens to be exact. In float64
    the reference is itself the computation at the input dtype, rounded by its ~10 operations in
    another order than the kernel's (FMA, association); with random coefficients that cancel, the
    output is small against its terms and either's relative error reaches tens of epsilons (17 seen
    in a sampler step): there the floor is 64 epsilons, still far below any indexing or formula bug."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or NaN)"
    kernel = rel_err(out, ref64)
    torch_err = rel_err(same_op_in_dtype, ref64)
    bound = 2 * torch_err + torch.finfo(out.dtype).eps * (64 if out.dtype == torch.float64 else 1)
    assert kernel <= bound, f"{what}: relative error {kernel:.3e} > bound {bound:.3e} (torch at dtype: {torch_err:.3e})"


def poison_allocator(like: torch.Tensor, count: int = 4) -> None:
    """Fill freed blocks of the size of ``like`` with NaN so that an output allocated next that a
    kernel leaves partly unwritten shows NaNs (certain with CUDA's caching allocator)."""
    blocks = [torch.full_like(like, float("nan"), memory_format=torch.contiguous_format) for _ in range(count)]
    del blocks


def backends_for(device: str) -> list[str]:
    if device == "cpu":  # Triton runs on CPU tensors only under its interpreter (set when there is no GPU)
        return ["cpu"] + (["triton"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])
    return ["cuda"] + (["triton"] if HAS_TRITON else [])


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def assert_close_to_reference_fp64(out: torch.Tensor, ref64: torch.Tensor, same_op_fp32: torch.Tensor, what: str):
    """The float64 form of :func:`assert_close_to_reference`, where the reference is itself a float64
    computation: PyTorch's float64 error is estimated as its float32 error on the same math scaled by
    the ratio of the unit roundoffs (same operations, same conditioning)."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or NaN)"
    kernel = rel_err(out, ref64)
    torch_err = rel_err(same_op_fp32, ref64) * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    bound = 2 * torch_err + 16 * torch.finfo(torch.float64).eps
    assert kernel <= bound, f"{what}: relative error {kernel:.3e} > bound {bound:.3e} (torch at fp64, est.: {torch_err:.3e})"


def count_host_syncs(fn) -> int:
    """How many synchronizing CUDA operations ``fn()`` performs (torch's sync debug mode, "warn").
    Counts torch's own "called a synchronizing CUDA operation" warnings only: the one-time note
    that the debug mode is a prototype also mentions "synchronizing operations" and would be
    counted by the first caller in a process."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)
