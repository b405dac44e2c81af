"""Reference semantics of SaRA's sparse ops (``fewstep::sara_gather_``, ``fewstep::sara_adamw_step_``).

A *selection* marks the trainable entries of one parameter (flattened, row-major) in one of
two formats (``FORMAT_INDICES``: k sorted int32 indices; ``FORMAT_BITMASK``: ceil(n/32)
int32 words, bit b of word w marking element 32w+b, plus one int32 per 1024-element chunk
holding the compact slot of the chunk's first selected entry). A tensor's selected entries
occupy k consecutive slots of flat fp32 buffers, in ascending dense order.

    gather:  out[slot] += scale * grad.flatten()[dense]        for each selected (dense, slot)
    AdamW:   for each tensor i of ``layout`` and each selected (dense, slot), c = compact_begin + slot,
             x = master[master_begin + slot] (fp16/bf16 weights) or weight[dense] (fp32);
             x *= 1 - lr*wd;  m = lerp(m, g, 1-beta1);  v = beta2 v + (1-beta2) g^2
             x -= lr/(1-beta1^step) * m / (sqrt(v)/sqrt(1-beta2^step) + eps);  weight[dense] = x
which is ``torch.optim.AdamW`` restricted to the selected entries.
"""
from __future__ import annotations

import math

import torch

FORMAT_INDICES = 0
FORMAT_BITMASK = 1
CHUNK = 1024
# Columns of the int64 layout table (csrc/sara/sara.h, LayoutCol).
COL_FORMAT, COL_NUMEL, COL_K, COL_COMPACT_BEGIN, COL_MASTER_BEGIN, COL_SEL_BEGIN, COL_CHUNK_BEGIN = range(7)
LAYOUT_COLS = 7

def _bit_weights(device: torch.device) -> torch.Tensor:
    # made on the device (arange + shift): copying a host constant there would wait for the device
    return torch.ones(8, dtype=torch.uint8, device=device) << torch.arange(8, dtype=torch.uint8, device=device)


def pack_bitmask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask words, chunk offsets) of a bool mask; little-endian bit order within words."""
    flat = mask.reshape(-1)
    n = flat.numel()
    chunks = -(-n // CHUNK)
    padded = torch.zeros(chunks * CHUNK, dtype=torch.bool, device=flat.device)
    padded[:n] = flat
    weights = _bit_weights(flat.device)
    as_bytes = (padded.view(-1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
    words = as_bytes.view(torch.int32)[: -(-n // 32)].clone()
    counts = padded.view(chunks, CHUNK).sum(-1, dtype=torch.int64)
    offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return words, offsets


def unpack_bitmask(words: torch.Tensor, numel: int) -> torch.Tensor:
    """Bool mask of ``numel`` elements from bitmask words (inverse of :func:`pack_bitmask`)."""
    as_bytes = words.contiguous().view(torch.uint8)
    bits = (as_bytes.unsqueeze(-1) & _bit_weights(words.device)) != 0
    return bits.reshape(-1)[:numel]


def selected_indices(fmt: int, selection: torch.Tensor, numel: int) -> torch.Tensor:
    """Ascending int64 dense indices of a selection."""
    if fmt == FORMAT_INDICES:
        return selection.long()
    return unpack_bitmask(selection, numel).nonzero().squeeze(1)


def sara_gather_reference(grad: torch.Tensor, out: torch.Tensor, selection: torch.Tensor,
                          chunk_offsets: torch.Tensor, fmt: int, scale: float) -> None:
    idx = selected_indices(fmt, selection, grad.numel())
    out.add_(grad.reshape(-1)[idx].to(out.dtype), alpha=scale)


def sara_adamw_step_reference(weights, exp_avg, exp_avg_sq, master, grad, layout, selection, chunk_offsets,
                              lr, beta1, beta2, eps, weight_decay, step) -> None:
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    for w, row in zip(weights, layout.tolist()):
        fmt, n, k, cb, mb, sb, _ = row
        sel = selection[sb: sb + (k if fmt == FORMAT_INDICES else -(-n // 32))]
        idx = selected_indices(fmt, sel, n)
        flat = w.view(-1)
        x = (master[mb: mb + k] if mb >= 0 else flat[idx]).to(exp_avg.dtype)  # a copy unless master
        m, v, g = exp_avg[cb: cb + k], exp_avg_sq[cb: cb + k], grad[cb: cb + k]
        x = x * (1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        x = x.addcdiv(m, v.sqrt() / bc2_sqrt + eps, value=-step_size)
        if mb >= 0:
            master[mb: mb + k] = x
        flat[idx] = x.to(w.dtype)
