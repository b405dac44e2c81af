"""What a head dim between powers of two costs on the GPU: device time of the forward and of the
backward (CUDA-graph replay), per-kernel times and dense SDPA's forward at the same shape, for
head dims 64, 72, 80, 96 and 128 with DiT's and PixArt's 16 heads at 64x64 image tokens + 300 text
tokens (bf16, r=16). 72 to 96 run on the 128-wide kernels (block_head_dim).

Usage: ``python bench/local_window_attention_head_dims_gpu.py [--out DIR]``; writes
``DIR/local_window_attention_head_dims.json``."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_replay_ms  # noqa: E402
from local_window_attention_tiles_gpu import kernel_times, write_rows  # noqa: E402

from fewstep.triton import local_window_attention as lwa  # noqa: E402

SIDE, N_TEXT, RADIUS, HEADS = 64, 300, 16.0, 16
HEAD_DIMS = [64, 72, 80, 96, 128]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    n = N_TEXT + SIDE * SIDE
    for head_dim in HEAD_DIMS:
        gen = torch.Generator(device="cuda").manual_seed(head_dim)
        q, k, v, grad_out = (torch.randn(1, HEADS, n, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                             for _ in range(4))
        pattern = (SIDE, SIDE, N_TEXT, RADIUS, -1, -1, head_dim ** -0.5)
        out, lse = lwa.forward(q, k, v, None, None, *pattern)
        row = dict(head_dim=head_dim, block_head_dim=lwa.block_head_dim(head_dim),
                   fwd_ms=graph_replay_ms(lambda: lwa.forward(q, k, v, None, None, *pattern)),
                   bwd_ms=graph_replay_ms(lambda: lwa.backward(grad_out, q, k, v, None, None, out, lse, *pattern)),
                   sdpa_fwd_ms=graph_replay_ms(lambda: F.scaled_dot_product_attention(q, k, v)),
                   kernel_ms=kernel_times(lambda: (lwa.forward(q, k, v, None, None, *pattern),
                                                   lwa.backward(grad_out, q, k, v, None, None, out, lse, *pattern))))
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_rows(args.out, "local_window_attention_head_dims.json", rows)


if __name__ == "__main__":
    main()
