"""The work the Triton local-window kernels do: how many query-key pairs each kernel computes scores
for (whole tiles, as the kernels compute them), beside how many the pattern admits.

A benchmark divides a kernel's FLOPs on these pairs by its time to get the rate on the work it
does (kernel efficiency), separately from the share of that work the pattern wastes (tile shape),
and the time a kernel would take at a given matrix rate (the floor for its tiles). The tile walk
is the kernels' (``walk_start`` / ``walk_next`` in ``_local_window_attention_kernels.py``), written
again in Python; ``tests/ops/test_local_window_attention_work.py`` checks that it covers every
admitted pair and visits no tile without one.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional

import torch

from fewstep.triton.local_window_attention import KernelTiles, _pattern, kernel_tiles

# Matrix-product FLOPs per computed pair and head dim element: the forward computes S = QK^T and
# PV; the dK/dV kernel recomputes S and dP = dO V^T and forms dV = P^T dO and dK = dS^T Q; the dQ
# kernel recomputes S and dP and forms dQ = dS K.
FLOPS_PER_PAIR = {"forward": 4, "kv_grad": 8, "q_grad": 6}


class KernelWork(NamedTuple):
    """Query-key pairs per (batch, query head)."""
    admitted: int  # pairs the pattern admits
    forward: int  # pairs whose scores forward_kernel computes
    kv_grad: int  # ... kv_grad_kernel
    q_grad: int  # ... q_grad_kernel

    def flops(self, head_dim: int, batch_heads: int = 1) -> dict:
        """FLOPs of each kernel on its computed pairs, and the useful FLOPs of the forward and of
        forward + backward (4·D and 14·D per admitted pair: two products forward, five backward)."""
        computed = {name: flops * head_dim * batch_heads * getattr(self, name)
                    for name, flops in FLOPS_PER_PAIR.items()}
        useful = 4 * head_dim * batch_heads * self.admitted
        return dict(computed, backward=computed["kv_grad"] + computed["q_grad"], useful_forward=useful,
                    useful_forward_backward=3.5 * useful)


def walk(fy0: int, fx0: int, rows: int, cols: int, grid_h: int, grid_w: int, reach_y: int, reach_x: int,
         max_d2: int, circle: bool, tile_rows: int, tile_cols: int) -> Iterator[tuple[int, int]]:
    """Corners (y0, x0) of the tile_rows x tile_cols tiles the kernels visit around the fixed
    rows x cols tile at (fy0, fx0): rows of tiles over the pattern's vertical reach, each over the
    columns the pattern reaches at that row's vertical gap."""
    fy1, fx1 = min(fy0 + rows, grid_h) - 1, min(fx0 + cols, grid_w) - 1
    for y0 in range(max(fy0 - reach_y, 0), min(fy1 + reach_y + 1, grid_h), tile_rows):
        gap = max(y0 - fy1, fy0 - (min(y0 + tile_rows, grid_h) - 1), 0)
        dx = math.isqrt(max_d2 - gap * gap) if circle else reach_x
        yield from ((y0, x0) for x0 in range(max(fx0 - dx, 0), min(fx1 + dx + 1, grid_w), tile_cols))


def admitted_pairs(grid: tuple[int, int], n_text: int = 0, *, radius: Optional[float] = None,
                   window: Optional[tuple[int, int]] = None, n_extra: int = 0) -> int:
    """Query-key pairs the pattern admits for one (batch, head): text queries see every sequence
    key, image queries every text and extra key and the image keys of their circle or window."""
    pattern = _pattern_of(grid, radius, window, "admitted_pairs")
    grid_h, grid_w = grid
    image = 0
    for dy in range(-pattern.reach_y, pattern.reach_y + 1):
        dx = math.isqrt(pattern.max_d2 - dy * dy) if pattern.circle else pattern.reach_x
        image += max(grid_h - abs(dy), 0) * sum(max(grid_w - abs(x), 0) for x in range(-dx, dx + 1))
    return n_text * (n_text + grid_h * grid_w) + grid_h * grid_w * (n_text + n_extra) + image


class KernelPrograms(NamedTuple):
    """Loop iterations of each program of one kernel for one (batch, head); every iteration computes
    one query block against one key block (block_m x block_n pairs)."""
    long: list  # text (and extra) blocks: every token sees them, or they see every token
    image: list  # image tiles, in grid order
    block_m: int
    block_n: int


def _pattern_of(grid, radius, window, caller: str):
    if (radius is None) == (window is None):
        raise ValueError(f"{caller}: expected exactly one of radius and window")
    window_h, window_w = window if window is not None else (-1, -1)
    return _pattern(*grid, radius if radius is not None else 0.0, window_h, window_w)


def kernel_programs(kernel: str, grid: tuple[int, int], n_text: int = 0, *, radius: Optional[float] = None,
                    window: Optional[tuple[int, int]] = None, n_extra: int = 0, head_dim: int = 128,
                    dtype: torch.dtype = torch.bfloat16, tiles: Optional[KernelTiles] = None) -> KernelPrograms:
    """The programs ``kernel`` ("forward", "kv_grad" or "q_grad") launches for one (batch, head) and
    how many key (or query) blocks each one visits, at ``tiles`` (default: the kernels' tiles)."""
    pattern = _pattern_of(grid, radius, window, "kernel_programs")
    tiles = tiles or kernel_tiles(head_dim, dtype)
    grid_h, grid_w = grid
    n_tokens = n_text + grid_h * grid_w
    reach = (grid_h, grid_w, pattern.reach_y, pattern.reach_x, pattern.max_d2, pattern.circle)
    t = getattr(tiles, kernel)
    block_m, block_n = t.ty * t.tx, t.ky * t.kx

    def blocks(n: int, block: int) -> int:
        return -(-n // block)

    if kernel == "kv_grad":  # text key blocks see every query row, extra key blocks every image row
        long = [blocks(n_tokens, block_m)] * blocks(n_text, block_n) + [blocks(grid_h * grid_w, block_m)] * blocks(
            n_extra, block_n)
        image = [blocks(n_text, block_m) + sum(1 for _ in walk(y0, x0, t.ky, t.kx, *reach, t.ty, t.tx))
                 for y0 in range(0, grid_h, t.ky) for x0 in range(0, grid_w, t.kx)]
    else:  # text query blocks see every key; image query tiles the text keys, their walk, the extra keys
        long = [blocks(n_tokens, block_n)] * blocks(n_text, block_m)
        image = [blocks(n_text, block_n) + blocks(n_extra, block_n) + sum(1 for _ in walk(y0, x0, t.ty, t.tx, *reach,
                                                                                         t.ky, t.kx))
                 for y0 in range(0, grid_h, t.ty) for x0 in range(0, grid_w, t.tx)]
    return KernelPrograms(long, image, block_m, block_n)


def kernel_work(grid: tuple[int, int], n_text: int = 0, *, radius: Optional[float] = None,
                window: Optional[tuple[int, int]] = None, n_extra: int = 0, head_dim: int = 128,
                dtype: torch.dtype = torch.bfloat16, tiles: Optional[KernelTiles] = None) -> KernelWork:
    """Pairs computed by each Triton kernel for one (batch, query head) of ``local_window_attention``
    with these arguments, at ``tiles`` (default: the kernels' tiles for head_dim and dtype)."""
    _pattern_of(grid, radius, window, "kernel_work")  # the argument check, named after this function
    tiles = tiles or kernel_tiles(head_dim, dtype)

    def pairs(kernel: str) -> int:
        programs = kernel_programs(kernel, grid, n_text, radius=radius, window=window, n_extra=n_extra, tiles=tiles)
        return (sum(programs.long) + sum(programs.image)) * programs.block_m * programs.block_n

    return KernelWork(admitted_pairs(grid, n_text, radius=radius, window=window, n_extra=n_extra), pairs("forward"),
                      pairs("kv_grad"), pairs("q_grad"))
