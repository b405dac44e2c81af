"""Tile-size sweep of the Triton local-window attention kernels on the GPU (bf16, B=1, 24 heads,
D=128; CLEAR's shapes): the measurement behind ``kernel_tiles`` (docs/attention.md).

Each candidate replaces one kernel's tiles (the other two keep their defaults), is checked
against the default tiles' result and timed (median device time, triton.testing.do_bench).
Usage: ``python bench/local_window_attention_tiles_gpu.py [--out DIR] [--kernel kv_grad ...]``;
prints a table and writes ``DIR/local_window_attention_tiles.json``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import gpu_median_ms  # noqa: E402

from fewstep.triton import local_window_attention as lwa  # noqa: E402
from fewstep.triton.local_window_attention import Tiles  # noqa: E402

HEADS, HEAD_DIM, DTYPE = 24, 128, torch.bfloat16
SHAPES = [(64, 512, 16.0, True), (128, 512, 16.0, False)]  # grid side, text, radius, time the backward
CANDIDATES = {  # the defaults first: the reference of each sweep
    "forward": [Tiles(8, 8, 8, 8, 4, 3), Tiles(8, 16, 2, 16, 8, 2), Tiles(8, 16, 4, 16, 8, 3),
                Tiles(8, 16, 8, 8, 8, 3), Tiles(8, 8, 4, 16, 4, 2)],
    # 8-warp dK/dV candidates measured 57-77 % slower (bench/NOTES.md) and are left out
    "kv_grad": [Tiles(4, 8, 8, 8, 4, 2), Tiles(2, 16, 4, 16, 4, 2), Tiles(2, 16, 4, 16, 4, 1),
                Tiles(2, 16, 8, 8, 4, 1), Tiles(1, 16, 4, 16, 4, 2), Tiles(4, 16, 4, 16, 8, 2),
                Tiles(2, 16, 8, 8, 4, 2), Tiles(4, 8, 4, 16, 4, 2), Tiles(2, 16, 4, 16, 4, 3),
                Tiles(2, 8, 4, 16, 4, 2), Tiles(2, 16, 2, 32, 4, 2), Tiles(1, 32, 4, 16, 4, 2)],
    "q_grad": [Tiles(8, 8, 8, 8, 4, 2), Tiles(8, 16, 2, 16, 8, 2), Tiles(8, 8, 4, 16, 4, 2)],
}


def kernel_times(fn, runs: int = 20) -> dict:
    """Mean device time per call of each kernel fn launches (torch.profiler), default tiles."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / runs / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def training_inputs(side: int, n_text: int, radius: float):
    """q, k, v, grad_out (bf16, seeded) of a side x side grid with n_text text tokens, and the ops'
    pattern arguments for the radius."""
    n = n_text + side * side
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
                         for _ in range(4))
    return q, k, v, grad_out, (side, side, n_text, radius, -1, -1, HEAD_DIM ** -0.5)


def write_rows(out_dir: str, name: str, rows: list) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--kernel", choices=list(CANDIDATES), action="append",
                        help="sweep only these kernels (default: all)")
    args = parser.parse_args()
    default_tiles = lwa.kernel_tiles
    rows = []
    for side, n_text, radius, backward in SHAPES:
        q, k, v, grad_out, pattern = training_inputs(side, n_text, radius)
        fwd = torch.ops.fewstep.local_window_attention_triton
        bwd = torch.ops.fewstep.local_window_attention_triton_backward
        ref_out, ref_lse = fwd(q, k, v, None, None, *pattern)
        ref_grads = bwd(grad_out, q, k, v, None, None, ref_out, ref_lse, *pattern)[:3]
        gpu_median_ms(lambda: fwd(q, k, v, None, None, *pattern), warmup_ms=500)  # clocks up before the sweep
        rows.append(dict(grid=f"{side}x{side}+{n_text}", radius=radius, kernel_ms=kernel_times(
            lambda: bwd(grad_out, q, k, v, None, None, ref_out, ref_lse, *pattern) if backward
            else fwd(q, k, v, None, None, *pattern))))
        print(json.dumps(rows[-1]), flush=True)
        for kernel, candidates in CANDIDATES.items():
            if (kernel != "forward" and not backward) or (args.kernel and kernel not in args.kernel):
                continue
            for tiles in candidates:
                index = ["forward", "kv_grad", "q_grad"].index(kernel)

                def patched(head_dim, dtype, tiles=tiles, index=index):
                    chosen = list(default_tiles(head_dim, dtype))
                    chosen[index] = tiles
                    return lwa.KernelTiles(*chosen)
                lwa.kernel_tiles = patched
                row = dict(grid=f"{side}x{side}+{n_text}", radius=radius, kernel=kernel, tiles=tuple(tiles))
                try:
                    if kernel == "forward":
                        out, _ = fwd(q, k, v, None, None, *pattern)
                        row["max_abs_diff"] = (out.float() - ref_out.float()).abs().max().item()
                        row["ms"] = gpu_median_ms(lambda: fwd(q, k, v, None, None, *pattern))
                    else:
                        grads = bwd(grad_out, q, k, v, None, None, ref_out, ref_lse, *pattern)[:3]
                        row["max_abs_diff"] = max((g.float() - r.float()).abs().max().item()
                                                  for g, r in zip(grads, ref_grads))
                        row["ms"] = gpu_median_ms(lambda: bwd(grad_out, q, k, v, None, None, ref_out, ref_lse,
                                                              *pattern))
                except Exception:  # a candidate that fails to compile or launch is reported, not fatal
                    row["error"] = traceback.format_exc(limit=2)[-400:]
                finally:
                    lwa.kernel_tiles = default_tiles
                rows.append(row)
                print(json.dumps(row), flush=True)
        write_rows(args.out, "local_window_attention_tiles.json", rows)


if __name__ == "__main__":
    main()
