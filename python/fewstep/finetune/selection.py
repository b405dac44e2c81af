"""Which entries of a parameter SaRA trains: thresholds and compact selections."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from fewstep.reference.sara import (CHUNK, FORMAT_BITMASK, FORMAT_INDICES, pack_bitmask, selected_indices,
                                    unpack_bitmask)


@dataclasses.dataclass
class TensorSelection:
    """The selected entries of one tensor, as sorted int32 indices or a bitmask (the smaller)."""

    format: int
    numel: int
    k: int
    data: torch.Tensor           # int32: k indices, or ceil(numel/32) bitmask words
    chunk_offsets: torch.Tensor  # int32: ceil(numel/1024) compact offsets (bitmask), else empty

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "TensorSelection":
        flat = mask.reshape(-1)
        n = flat.numel()
        if n >= 2 ** 31:
            raise ValueError(f"mask: expected fewer than 2^31 elements (int32 selections), got {n}")
        k = int(flat.sum())  # one host read per tensor, at selection time only
        bitmask_bytes = 4 * (-(-n // 32) + -(-n // CHUNK))
        if 4 * k <= bitmask_bytes:
            idx = flat.nonzero().squeeze(1).to(torch.int32)
            return cls(FORMAT_INDICES, n, k, idx, torch.empty(0, dtype=torch.int32, device=flat.device))
        words, offsets = pack_bitmask(flat)
        return cls(FORMAT_BITMASK, n, k, words, offsets)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * 4 + self.chunk_offsets.numel() * 4

    def dense_mask(self) -> torch.Tensor:
        """Bool mask of ``numel`` elements (transient; for checkpoints and the low-rank penalty)."""
        if self.format == FORMAT_BITMASK:
            return unpack_bitmask(self.data, self.numel)
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.data.device)
        mask.index_fill_(0, self.data.long(), True)  # indexed assignment of a Python scalar syncs on CUDA
        return mask

    def indices(self) -> torch.Tensor:
        """Ascending int64 dense indices."""
        return selected_indices(self.format, self.data, self.numel)

    def to_state(self) -> dict:
        return {"format": self.format, "numel": self.numel, "k": self.k, "data": self.data,
                "chunk_offsets": self.chunk_offsets}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "TensorSelection":
        return cls(int(state["format"]), int(state["numel"]), int(state["k"]), state["data"].to(device),
                   state["chunk_offsets"].to(device))


def magnitude_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """|w| < threshold, compared in float32 (the rule checkpoints rely on to recreate selections)."""
    return weight.detach().abs().float() < threshold


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    # Non-negative float32 values order like their int32 bit patterns.
    return t.detach().abs().float().reshape(-1).view(torch.int32)


def smallest_magnitude_threshold(weights: Sequence[torch.Tensor], ratio: float) -> float:
    """The float32 threshold θ such that |w| < θ selects the smallest ``ratio`` of all entries
    (exactly floor(ratio·n) of them, more only where values tie), by a two-pass radix select."""
    total = sum(w.numel() for w in weights)
    k = max(1, math.floor(ratio * total))
    device = weights[0].device
    high = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for w in weights:  # pass 1: histogram of the top 16 of the 31 value bits
        high += torch.bincount(_float_bits(w) >> 15, minlength=1 << 16)
    cum = torch.cumsum(high, 0)
    bucket = int(torch.searchsorted(cum, torch.tensor([k], device=device)))
    rank_in_bucket = k - (int(cum[bucket - 1]) if bucket > 0 else 0)
    low = torch.zeros(1 << 15, dtype=torch.int64, device=device)
    for w in weights:  # pass 2: histogram of the low 15 bits inside that bucket
        bits = _float_bits(w)
        low += torch.bincount(bits[(bits >> 15) == bucket] & 0x7FFF, minlength=1 << 15)
    offset = int(torch.searchsorted(torch.cumsum(low, 0), torch.tensor([rank_in_bucket], device=device)))
    kth = torch.tensor([(bucket << 15) | offset], dtype=torch.int32).view(torch.float32)
    # The next float32 above the k-th smallest magnitude: |w| < θ  <=>  |w| <= kth.
    return float(torch.nextafter(kth, torch.tensor([math.inf]))[0])
