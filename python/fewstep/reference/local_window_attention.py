"""Reference semantics of local-window (CLEAR) attention (``fewstep::local_window_attention``).

Sequence layout: ``[n_text text tokens | H*W image tokens in raster order]`` (N = n_text + H*W),
optionally followed, for keys and values only, by ``E`` extra tokens (CLEAR's pooled K/V, or
register tokens).

Who attends to whom (``local_window_mask``):
- a text query attends every text and image key, and no extra key;
- an image query at (y, x) attends every text key, every extra key, and the image key at
  (y', x') iff ``(y - y')**2 + (x - x')**2 < radius**2`` (strict; CLEAR's circle), or, with
  ``window=(ry, rx)``, iff ``|y - y'| <= ry and |x - x'| <= rx`` (no shifting at borders).

q is ``[B, heads, N, D]``; k and v are ``[B, kv_heads, N, D]`` with ``heads % kv_heads == 0``
(query head h reads kv head ``h // (heads // kv_heads)``); extra_k / extra_v are
``[B, kv_heads, E, D]``. ``out = softmax(scale * q k^T + mask) v`` and
``lse = logsumexp(scale * q k^T + mask)`` (natural log, over the admitted keys), per query row.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def local_window_mask(grid: tuple[int, int], n_text: int, *, radius: Optional[float] = None,
                      window: Optional[tuple[int, int]] = None, n_extra: int = 0,
                      device=None) -> torch.Tensor:
    """Boolean ``[N, N + n_extra]`` mask, True where a query (row) attends a key (column)."""
    if (radius is None) == (window is None):
        raise ValueError("local_window_mask: expected exactly one of radius and window")
    h, w = grid
    n_img = h * w
    n = n_text + n_img
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy = ys[:, None] - ys[None, :]
    dx = xs[:, None] - xs[None, :]
    if radius is not None:
        image = (dy * dy + dx * dx).double() < float(radius) ** 2
    else:
        image = (dy.abs() <= window[0]) & (dx.abs() <= window[1])
    mask = torch.zeros(n, n + n_extra, dtype=torch.bool, device=device)
    mask[:n_text, :n] = True
    mask[n_text:, :n_text] = True
    mask[n_text:, n_text:n] = image
    mask[n_text:, n:] = True
    return mask


def local_window_attention_reference(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int],
        radius: Optional[float] = None, window: Optional[tuple[int, int]] = None, n_text: int = 0,
        extra_k: Optional[torch.Tensor] = None, extra_v: Optional[torch.Tensor] = None,
        scale: Optional[float] = None, dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) by dense masked attention in ``dtype``; differentiable in q, k, v, extra_k/v.

    out has q's dtype; lse is float32 (float64 when q is float64), shape ``[B, heads, N]``.
    """
    out_dtype = q.dtype
    heads, kv_heads = q.shape[1], k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if extra_k is not None:
        k = torch.cat([k, extra_k], dim=2)
        v = torch.cat([v, extra_v], dim=2)
    group = heads // kv_heads
    k = k.to(dtype).repeat_interleave(group, dim=1)
    v = v.to(dtype).repeat_interleave(group, dim=1)
    n_extra = 0 if extra_k is None else extra_k.shape[2]
    mask = local_window_mask(grid, n_text, radius=radius, window=window, n_extra=n_extra,
                             device=q.device)
    scores = scale * (q.to(dtype) @ k.transpose(-1, -2))
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    lse_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    return out.to(out_dtype), lse.to(lse_dtype)
