"""Test cases of local-window attention shared by the op tests (every backend) and the C++ tests."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    grid: tuple[int, int]
    n_text: int
    n_extra: int = 0
    radius: Optional[float] = None
    window: Optional[tuple[int, int]] = None
    scale: Optional[float] = None
    noncontiguous: bool = False

    @property
    def seq_len(self) -> int:
        return self.n_text + self.grid[0] * self.grid[1]

    def kwargs(self) -> dict:
        """The public function's pattern arguments."""
        return dict(grid=self.grid, n_text=self.n_text, radius=self.radius, window=self.window)

    def pattern(self) -> tuple:
        """The compiled ops' trailing arguments: grid_h, grid_w, n_text, radius, window_h, window_w, scale."""
        radius, (wh, ww) = (self.radius, (-1, -1)) if self.radius is not None else (0.0, self.window)
        scale = self.scale if self.scale is not None else 1 / math.sqrt(self.head_dim)
        return (self.grid[0], self.grid[1], self.n_text, radius, wh, ww, scale)
