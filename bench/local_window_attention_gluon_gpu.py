"""A/B of the Gluon sm_90 kernels of local-window attention (forward and dK/dV,
``fewstep/triton/_local_window_attention_gluon.py``, hand-pipelined) against the Triton kernels on
the H200/H100, in one process, through the same launchers (``launch_forward``,
``launch_backward``) on the same inputs. Per shape: CUDA-graph device time of the forward and of
the backward (median of many replays), the forward's useful and computed TFLOP/s, the largest
differences of out, lse, dQ, dK and dV from the Triton kernels', and dense SDPA's forward in the same
run for the rate it reaches on the card.

Usage: ``python bench/local_window_attention_gluon_gpu.py [--out DIR] [--jit] [--all-pairs]
[NAME=PATH ...]`` (a variant module that defines ``launch_backward`` times its own backward
launcher); writes
``DIR/local_window_attention_gluon.json`` and ``.md``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_replay_ms  # noqa: E402
from local_window_attention_gpu import CASES, MODEL_CASES, Shape  # noqa: E402

from fewstep.ops.local_window_attention import _pattern_args  # noqa: E402
from fewstep.triton import local_window_attention as lwa  # noqa: E402
from fewstep.triton.local_window_attention_work import admitted_pairs, kernel_work  # noqa: E402

SHAPES = [*CASES, MODEL_CASES[2], Shape(64, 512, 16, True, 24, 64, "D=64")]
# Every pair admitted (radius beyond the grid's diagonal): the kernels' rate on dense work, against SDPA's.
ALL_PAIRS = Shape(64, 512, 91, True, 24, 128, "all pairs")
GLUON_MODULE = "fewstep.triton._local_window_attention_gluon"


def gluon_variant(name: str, path: str):
    """A copy of the Gluon kernel module (same kernel names and signatures) to time against the
    landed one: the launchers import the kernels from sys.modules[GLUON_MODULE] at each call."""
    spec = importlib.util.spec_from_file_location(f"lwa_gluon_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(shape: Shape, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = shape.n_text + shape.side * shape.side
    return [torch.randn(1, shape.heads, n, shape.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(3)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--jit", action="store_true",
                        help="launch every kernel through Triton's JIT (variants that change the launch grid)")
    parser.add_argument("--all-pairs", action="store_true", help="also time a shape whose every pair is admitted")
    parser.add_argument("variants", nargs="*", help="NAME=PATH of a copy of the Gluon kernel module")
    args = parser.parse_args()
    if args.jit:
        from fewstep.triton.direct_launch import launch_through_jit
        lwa.direct_launch = launch_through_jit
    import fewstep.triton._local_window_attention_gluon as landed
    variants = {"triton": (False, landed), "gluon": (True, landed)}
    variants.update({name: (True, gluon_variant(name, path)) for name, path in (v.split("=", 1) for v in args.variants)})
    rows = []
    for shape in SHAPES + ([ALL_PAIRS] if args.all_pairs else []):
        q, k, v = inputs(shape)
        pattern = _pattern_args(q, (shape.side, shape.side), shape.radius, None, shape.n_text, None)
        useful = admitted_pairs((shape.side, shape.side), shape.n_text, radius=shape.radius) * shape.heads
        computed = kernel_work((shape.side, shape.side), shape.n_text, radius=shape.radius).forward * shape.heads
        flops = 4 * shape.head_dim
        ref_out, ref_lse = lwa.launch_forward(False, q, k, v, None, None, *pattern)
        grad_out = torch.randn_like(q)
        ref_grads = lwa.launch_backward(False, grad_out, q, k, v, None, None, ref_out, ref_lse, *pattern)
        label = f"{shape.side}x{shape.side}+{shape.n_text} r={shape.radius:g} {shape.heads}x{shape.head_dim}"
        for name, (gluon, module) in variants.items():
            sys.modules[GLUON_MODULE] = module
            out, lse = lwa.launch_forward(gluon, q, k, v, None, None, *pattern)
            ms = graph_replay_ms(lambda: lwa.launch_forward(gluon, q, k, v, None, None, *pattern))
            # a variant module may bring its own backward launcher (kernels launched differently)
            launch_backward = getattr(module, "launch_backward", lwa.launch_backward)
            bwd_ms = graph_replay_ms(lambda: launch_backward(gluon, grad_out, q, k, v, None, None, ref_out, ref_lse,
                                                             *pattern))
            grads = launch_backward(gluon, grad_out, q, k, v, None, None, ref_out, ref_lse, *pattern)
            row = dict(shape=label, variant=name, ms=round(ms, 4), backward_ms=round(bwd_ms, 4),
                       max_grad_rel_diff=max(float((g.float() - r.float()).abs().max() / r.float().abs().max())
                                             for g, r in zip(grads[:3], ref_grads[:3])),
                       useful_tflops=round(useful * flops / ms / 1e9, 1),
                       computed_tflops=round(computed * flops / ms / 1e9, 1),
                       max_out_diff=float((out.float() - ref_out.float()).abs().max()),
                       max_lse_diff=float((lse - ref_lse).abs().max()))
            rows.append(row)
            print(row, flush=True)
        sys.modules[GLUON_MODULE] = landed
        dense_ms = graph_replay_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        n = q.shape[2]
        rows.append(dict(shape=label, variant="dense SDPA", ms=round(dense_ms, 4),
                         useful_tflops=round(shape.heads * n * n * flops / dense_ms / 1e9, 1)))
        print(rows[-1], flush=True)
    import triton
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    with open(os.path.join(args.out, "local_window_attention_gluon.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    lines = [f"# Local-window attention: Gluon sm_90 kernels against the Triton kernels ({env['gpu']})", "",
             f"torch {env['torch']}, triton {env['triton']}; bf16, B=1; CUDA-graph device time.", "",
             "| shape | kernels | forward ms | backward ms | forward useful TFLOP/s | forward computed TFLOP/s | "
             "max out diff | max lse diff | max dQ, dK, dV diff (relative to max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['variant']} | {r['ms']:.4f} | {r.get('backward_ms', '')} | "
                     f"{r['useful_tflops']} | {r.get('computed_tflops', '')} | {r.get('max_out_diff', '')} | "
                     f"{r.get('max_lse_diff', '')} | {r.get('max_grad_rel_diff', '')} |")
    with open(os.path.join(args.out, "local_window_attention_gluon.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
