"""A/B timing of variants of the local-window attention kernel module on the GPU (bf16, B=1, 24
heads, D=128; CLEAR's shapes): each variant is a copy of
``fewstep/triton/_local_window_attention_kernels.py`` with the same kernel signatures, run through
the production launchers, or through a copy of the launcher module (``NAME=KERNELS:LAUNCHER``, for
changes to both, e.g. the previous commit's pair from ``git show``). Per variant and shape: device
time of the forward and of the backward launcher (CUDA-graph replay, so host overhead is left out),
per-kernel profiler times, host time per call (back-to-back calls without a sync), and the largest difference from the first variant's outputs and
gradients. Variants are timed in turn, twice, in reverse order the second time, so clock drift does
not favour one.

Usage: ``python bench/local_window_attention_variants_gpu.py [--out DIR] NAME=KERNELS[:LAUNCHER] ...``;
writes ``DIR/local_window_attention_variants.json``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import gpu_median_ms, graph_replay_ms  # noqa: E402
from local_window_attention_host_gpu import host_us  # noqa: E402
from local_window_attention_tiles_gpu import kernel_times, training_inputs, write_rows  # noqa: E402

from fewstep.triton import local_window_attention as lwa  # noqa: E402

SHAPES = [(64, 512, 16.0), (64, 512, 8.0), (128, 512, 16.0), (64, 0, 16.0)]  # grid side, text tokens, radius
KERNEL_NAMES = ("forward_kernel", "delta_kernel", "kv_grad_kernel", "q_grad_kernel")


def load_variant(name: str, spec: str):
    """The launcher module of a variant, its ``_kernels`` returning the variant's kernels. A launcher
    copy is executed without its op registrations (the ops exist once, in fewstep)."""
    kernels_path, _, launcher_path = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"lwa_variant_{name}", kernels_path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    import triton
    # the kernels in the order the launcher unpacks them (earlier versions had a separate delta kernel)
    kernels = (triton, *(getattr(module, name) for name in KERNEL_NAMES if hasattr(module, name)))
    launcher = lwa
    if launcher_path:
        source = open(launcher_path).read()
        launcher = types.ModuleType(f"lwa_launcher_{name}")
        exec(compile(source[:source.index("local_window_attention_triton = ")], launcher_path, "exec"),
             launcher.__dict__)
    return launcher, kernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("variants", nargs="+", help="NAME=PATH of a kernel module")
    args = parser.parse_args()
    variants = {name: load_variant(name, path) for name, path in (v.split("=", 1) for v in args.variants)}
    rows = []
    for side, n_text, radius in SHAPES:
        q, k, v, grad_out, pattern = training_inputs(side, n_text, radius)
        reference = None
        order = list(variants) + list(reversed(variants))
        for run, name in enumerate(order):
            launcher, kernels = variants[name]
            launcher._kernels = lambda kernels=kernels: kernels
            fwd, bwd = launcher.forward, launcher.backward
            out, lse = fwd(q, k, v, None, None, *pattern)
            grads = bwd(grad_out, q, k, v, None, None, out, lse, *pattern)[:3]
            if reference is None:
                reference = (out, *grads)
                gpu_median_ms(lambda: fwd(q, k, v, None, None, *pattern), warmup_ms=500)  # clocks up
            row = dict(grid=f"{side}x{side}+{n_text}", radius=radius, variant=name, run=run,
                       max_abs_diff=max((a.float() - b.float()).abs().max().item()
                                        for a, b in zip((out, *grads), reference)),
                       fwd_ms=graph_replay_ms(lambda: fwd(q, k, v, None, None, *pattern)),
                       bwd_ms=graph_replay_ms(lambda: bwd(grad_out, q, k, v, None, None, out, lse, *pattern)),
                       fwd_events_ms=gpu_median_ms(lambda: fwd(q, k, v, None, None, *pattern)),
                       bwd_events_ms=gpu_median_ms(lambda: bwd(grad_out, q, k, v, None, None, out, lse, *pattern)),
                       fwd_host_us=host_us(lambda: fwd(q, k, v, None, None, *pattern)),
                       bwd_host_us=host_us(lambda: bwd(grad_out, q, k, v, None, None, out, lse, *pattern)))
            if run < len(variants):
                row["kernel_ms"] = kernel_times(lambda: bwd(grad_out, q, k, v, None, None, out, lse, *pattern))
            rows.append(row)
            print(json.dumps(row), flush=True)
        write_rows(args.out, "local_window_attention_variants.json", rows)


if __name__ == "__main__":
    main()
