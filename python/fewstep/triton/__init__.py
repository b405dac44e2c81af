"""Triton kernels of fewstep, each registered as a ``torch.ops.fewstep.*_triton`` custom op.

Triton itself is imported lazily, on the first launch, so fewstep imports without it.
"""
