"""``LocalWindowAttention``: CLEAR's local-window attention as a module, and ``PooledKV``, CLEAR's
learnable down-sampled keys and values.

The module holds the pattern (radius or window, token grid, text-token count, scale) and calls
:func:`fewstep.ops.local_window_attention`; the grid and text count may instead be given per call,
for models that see several resolutions. With ``pooled_kv_factor=f`` the image keys and values
are also pooled over f x f blocks of the grid with learnable weights and appended as extra tokens
(seen by image queries only), as in CLEAR's down-sampled variant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fewstep.ops.local_window_attention import local_window_attention


def check_pattern(radius: Optional[float], window: Optional[tuple[int, int]]) -> None:
    """Exactly one of ``radius`` (a number >= 1) and ``window`` (two ints >= 0)."""
    if (radius is None) == (window is None):
        raise ValueError(f"radius: expected exactly one of radius and window, got radius={radius!r}, "
                         f"window={window!r}")
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float))
                               or not radius >= 1):
        raise ValueError(f"radius: expected a number >= 1, got {radius!r}")
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window)):
        raise ValueError(f"window: expected (ry, rx), two ints >= 0, got {window!r}")


def check_grid(grid) -> tuple[int, int]:
    """``grid`` as a tuple of two ints >= 1."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid: expected (H, W), two ints >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


class PooledKV(nn.Module):
    """Image keys (or values) pooled over ``factor`` x ``factor`` blocks of the token grid with one
    learnable weight per position in the block (``spatial_weight``, shared by heads and channels,
    initialised to the mean). H and W must be multiples of ``factor``.

    ``spatial_weight`` is ``[f, f]``; CLEAR's checkpoints store the same numbers as
    ``[1, 1, 1, f, 1, f, 1]`` (``.view(f, f)`` converts them).
    """

    def __init__(self, factor: int, *, device=None, dtype=None):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"pooled_kv_factor: expected an int >= 1, got {factor!r}")
        self.factor = factor
        self.spatial_weight = nn.Parameter(
            torch.full((factor, factor), 1.0 / (factor * factor), device=device, dtype=dtype))

    def forward(self, image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``image`` ``[B, heads, H*W, D]`` (raster order) -> ``[B, heads, (H/f)*(W/f), D]``."""
        h, w = grid
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"grid: expected H and W divisible by the pooling factor {f}, got {tuple(grid)}")
        if image.dim() != 4 or image.shape[2] != h * w:
            raise ValueError(f"image: expected [B, heads, H*W={h * w}, D] image tokens, got {list(image.shape)}")
        blocks = image.unflatten(2, (h // f, f, w // f, f))
        pooled = torch.einsum("bnyixjd,ij->bnyxd", blocks, self.spatial_weight.to(image.dtype))
        return pooled.flatten(2, 3)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class LocalWindowAttention(nn.Module):
    """Attention of ``[n_text text | H*W image tokens]``: image queries see image keys inside
    ``radius`` (strict circle) or ``window=(ry, rx)`` on the grid, all text keys and the extra
    (pooled) keys; text queries see every text and image key. See
    :func:`fewstep.ops.local_window_attention` for shapes and backends.
    """

    def __init__(self, *, radius: Optional[float] = None, window: Optional[tuple[int, int]] = None,
                 grid: Optional[tuple[int, int]] = None, n_text: int = 0, scale: Optional[float] = None,
                 pooled_kv_factor: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        check_pattern(radius, window)
        if isinstance(n_text, bool) or not isinstance(n_text, int) or n_text < 0:
            raise ValueError(f"n_text: expected an int >= 0, got {n_text!r}")
        self.radius = radius
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.grid = None if grid is None else check_grid(grid)
        self.n_text = n_text
        self.scale = scale
        self.pooled_kv = (None if pooled_kv_factor is None
                          else PooledKV(pooled_kv_factor, device=device, dtype=dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                grid: Optional[tuple[int, int]] = None, n_text: Optional[int] = None,
                extra_k: Optional[torch.Tensor] = None, extra_v: Optional[torch.Tensor] = None,
                return_lse: bool = False):
        """q ``[B, heads, N, D]``, k and v ``[B, kv_heads, N, D]``; ``grid`` and ``n_text``
        override the module's. Returns out ``[B, heads, N, D]`` (and lse with ``return_lse``)."""
        grid = self.grid if grid is None else check_grid(grid)
        if grid is None:
            raise ValueError("grid: expected (H, W) at construction or call, got None")
        n_text = self.n_text if n_text is None else n_text
        if self.pooled_kv is not None:
            image = slice(n_text, None)
            pooled_k = self.pooled_kv(k[:, :, image], grid)
            pooled_v = self.pooled_kv(v[:, :, image], grid)
            extra_k = pooled_k if extra_k is None else torch.cat([extra_k, pooled_k], dim=2)
            extra_v = pooled_v if extra_v is None else torch.cat([extra_v, pooled_v], dim=2)
        return local_window_attention(q, k, v, grid=grid, radius=self.radius, window=self.window,
                                      n_text=n_text, extra_k=extra_k, extra_v=extra_v, scale=self.scale,
                                      return_lse=return_lse)

    def forward_flat(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int,
                     kv_heads: Optional[int] = None, grid: Optional[tuple[int, int]] = None,
                     n_text: Optional[int] = None) -> torch.Tensor:
        """The same on ``[B, N, heads*D]`` q and ``[B, N, kv_heads*D]`` k, v (the layout of linear
        projections); returns ``[B, N, heads*D]``."""
        kv_heads = heads if kv_heads is None else kv_heads
        for name, t, n in (("q", q, heads), ("k", k, kv_heads), ("v", v, kv_heads)):
            if t.dim() != 3 or t.shape[-1] % n:
                raise ValueError(f"{name}: expected [B, N, {n}*D], got {list(t.shape)}")
        split = lambda t, n: t.unflatten(-1, (n, -1)).transpose(1, 2)  # noqa: E731
        out = self(split(q, heads), split(k, kv_heads), split(v, kv_heads), grid=grid, n_text=n_text)
        return out.transpose(1, 2).flatten(2)

    def extra_repr(self) -> str:
        pattern = f"radius={self.radius}" if self.radius is not None else f"window={self.window}"
        return f"{pattern}, grid={self.grid}, n_text={self.n_text}, scale={self.scale}"
