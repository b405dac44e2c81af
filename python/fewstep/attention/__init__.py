"""Attention modules on fewstep's kernels (see :mod:`fewstep.attention.local_window`)."""
from fewstep.attention.local_window import LocalWindowAttention, PooledKV

__all__ = ["LocalWindowAttention", "PooledKV"]
