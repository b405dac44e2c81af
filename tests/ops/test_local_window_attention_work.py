"""The work model of the Triton local-window kernels (fewstep.triton.local_window_attention_work):
its tile walk covers every pair the pattern admits, visits no tile twice and no tile without an
admitted pair, and its counts are those of the kernels' loops."""
from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

from fewstep.reference.local_window_attention import local_window_mask
from fewstep.triton.local_window_attention import KernelTiles, Tiles, _pattern
from fewstep.triton.local_window_attention_work import admitted_pairs, kernel_programs, kernel_work, walk

PATTERNS = [dict(radius=1.0), dict(radius=2.5), dict(radius=4.0), dict(radius=40.0), dict(window=(0, 0)),
            dict(window=(1, 3)), dict(window=(2, 0))]
GRIDS = [(1, 1), (5, 9), (13, 7), (11, 17)]
TILES = [(4, 8, 2, 8), (2, 16, 4, 16), (8, 8, 8, 8), (3, 5, 2, 7)]  # fixed tile (rows, cols), walked tile


def _image_mask(grid, pattern_kwargs) -> torch.Tensor:
    return local_window_mask(grid, 0, **pattern_kwargs)


def _pattern_of(grid, pattern_kwargs):
    if "radius" in pattern_kwargs:
        return _pattern(*grid, pattern_kwargs["radius"], -1, -1)
    return _pattern(*grid, 0.0, *pattern_kwargs["window"])


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("pattern_kwargs", PATTERNS, ids=lambda p: str(p))
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: "x".join(map(str, t)))
def test_walk_covers_the_pattern_and_visits_only_needed_tiles(grid, pattern_kwargs, tiles):
    h, w = grid
    rows, cols, tile_rows, tile_cols = tiles
    mask = _image_mask(grid, pattern_kwargs)  # symmetric: the walk serves queries and keys alike
    p = _pattern_of(grid, pattern_kwargs)
    for fy0 in range(0, h, rows):
        for fx0 in range(0, w, cols):
            fixed = [y * w + x for y in range(fy0, min(fy0 + rows, h)) for x in range(fx0, min(fx0 + cols, w))]
            tiles_seen = list(walk(fy0, fx0, rows, cols, h, w, p.reach_y, p.reach_x, p.max_d2, p.circle,
                                   tile_rows, tile_cols))
            assert len(set(tiles_seen)) == len(tiles_seen), "a tile is visited twice"
            covered = torch.zeros(h * w, dtype=torch.bool)
            for y0, x0 in tiles_seen:
                assert 0 <= y0 < h and 0 <= x0 < w, f"tile ({y0}, {x0}) starts outside the {h}x{w} grid"
                keys = [y * w + x for y in range(y0, min(y0 + tile_rows, h)) for x in range(x0, min(x0 + tile_cols, w))]
                assert not covered[keys].any(), f"tile ({y0}, {x0}) overlaps an earlier tile"
                covered[keys] = True
                assert mask[fixed][:, keys].any(), f"tile ({y0}, {x0}) has no admitted pair with ({fy0}, {fx0})"
            needed = mask[fixed].any(0)
            assert not (needed & ~covered).any(), f"admitted keys of ({fy0}, {fx0}) are not visited"


@pytest.mark.parametrize("n_text,n_extra", [(0, 0), (5, 0), (3, 4)])
@pytest.mark.parametrize("pattern_kwargs", [dict(radius=2.5), dict(window=(1, 2))], ids=str)
def test_admitted_pairs_match_the_reference_mask(n_text, n_extra, pattern_kwargs):
    grid = (7, 10)
    work = kernel_work(grid, n_text, n_extra=n_extra, tiles=KernelTiles(*[Tiles(4, 8, 2, 8, 4, 1)] * 3),
                       **pattern_kwargs)
    assert work.admitted == int(local_window_mask(grid, n_text, n_extra=n_extra, **pattern_kwargs).sum())


def test_counts_follow_the_kernels_loops():
    """Cases small enough to count by hand."""
    # 4x8 grid, each query sees itself only: one 4x8 query tile (32 rows) walks two 2x8 key-tile rows.
    tiles = KernelTiles(Tiles(4, 8, 2, 8, 4, 1), Tiles(2, 8, 4, 8, 4, 1), Tiles(4, 8, 2, 8, 4, 1))
    work = kernel_work((4, 8), 0, window=(0, 0), tiles=tiles)
    assert work.admitted == 32
    assert work.forward == work.q_grad == 32 * 2 * 16
    # dK/dV: one 4x8 key tile (32 keys) against two 2x8 query tiles (16 rows each)
    assert work.kv_grad == 32 * 2 * 16
    # Text (3 tokens) and extra keys (5): the forward's one text block of 32 rows sees all 35 tokens in
    # 16-key blocks (48 columns); each image query tile adds one 16-key text block and one extra block.
    work = kernel_work((4, 8), 3, window=(0, 0), n_extra=5, tiles=tiles)
    assert work.forward == 32 * 48 + 32 * (16 + 16 + 2 * 16)
    # dK/dV: one text key block (32 keys) against all 35 query rows (3 blocks of 16); the image key tile
    # against the text rows (one block) and its two query tiles; one extra block against the 32 image rows.
    assert work.kv_grad == 32 * 48 + 32 * (16 + 2 * 16) + 32 * 32
    flops = work.flops(head_dim=64, batch_heads=3)
    assert flops["forward"] == 4 * 64 * 3 * work.forward
    assert flops["backward"] == 64 * 3 * (8 * work.kv_grad + 6 * work.q_grad)
    assert flops["useful_forward_backward"] == 14 * 64 * 3 * work.admitted


def test_needs_exactly_one_pattern():
    with pytest.raises(ValueError, match="exactly one of radius and window"):
        kernel_work((4, 4), 0)
    with pytest.raises(ValueError, match="exactly one of radius and window"):
        kernel_work((4, 4), 0, radius=2.0, window=(1, 1))


BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def _bench_module(name: str):
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


@pytest.mark.parametrize("grid,n_text,radius", [((64, 64), 512, 16.0), ((13, 29), 7, 4.5), ((5, 3), 0, 1.0)])
def test_admitted_pairs_at_the_benchmark_shape(grid, n_text, radius):
    """The count the benchmark's useful FLOPs use, against the reference mask (CLEAR's training shape too)."""
    expected = int(local_window_mask(grid, n_text, radius=radius).sum())
    assert admitted_pairs(grid, n_text, radius=radius) == kernel_work(grid, n_text, radius=radius).admitted == expected


def test_work_report_of_the_h200_run():
    work = _bench_module("local_window_attention_work")
    with open(os.path.join(BENCH, "results", "2026-12-01-NVIDIA-H200-local_window_attention.json")) as f:
        results = json.load(f)
    run_tiles = KernelTiles(Tiles(8, 8, 8, 8, 4, 3), Tiles(4, 8, 8, 8, 4, 2), Tiles(8, 8, 8, 8, 4, 2))
    text = work.report(results, run_tiles, {("64x64+512 r=16", "kv_grad_kernel"): 0.6928})
    # 64x64+512, r=16 forward: 0.2832 ms on 112 GFLOP computed (87 useful) is 396 TFLOP/s; SDPA 596.
    assert "| 64x64+512 r=16 | fwd | 0.283 | 87 | 112 | 77% | 396 | 596 | 0.188 |" in text
    assert "| 64x64+512 r=16 | kv_grad_kernel | 0.693 | 221 | 319 |" in text
    # 4x FlexAttention's 3.148 ms
    assert "| 128x128+512 r=16 | fwd | 4x flex raster (CLEAR) | 0.787 | 1.206 |" in text


def test_launch_order_model_hands_programs_to_the_first_free_slot():
    work = _bench_module("local_window_attention_work")
    assert work.makespan([3, 1, 1, 1], 2) == 3
    assert work.makespan([1, 1, 1, 3], 2) == 4  # the long program last runs alone at the end
    assert work.makespan([5], 4) == 5


def test_programs_per_kernel():
    tiles = KernelTiles(Tiles(4, 8, 2, 8, 4, 1), Tiles(2, 8, 4, 8, 4, 1), Tiles(4, 8, 2, 8, 4, 1))
    forward = kernel_programs("forward", (4, 8), 40, window=(0, 0), tiles=tiles)
    # two 32-row text blocks over 72 tokens in 16-key blocks; one image tile: 3 text blocks + 2 key-tile rows
    assert (forward.long, forward.image, forward.block_m, forward.block_n) == ([5, 5], [3 + 2], 32, 16)
    kv = kernel_programs("kv_grad", (4, 8), 40, window=(0, 0), n_extra=3, tiles=tiles)
    # two 32-key text blocks over 72 query rows in 16-row blocks, one extra block over the 32 image rows
    assert (kv.long, kv.image) == ([5, 5, 2], [3 + 2])
