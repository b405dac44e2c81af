"""Host (CPU) time of local-window attention calls on the GPU machine: what the eager timings of
bench/local_window_attention_gpu.py include where it exceeds the device time.

Issues each call back-to-back without synchronising (fewer launches than the GPU's queue holds, so
the host never waits): wall time per call = host time, for the ops, the public function (eager: a
plain autograd.Function over the launchers) and a forward + backward step through the public
function and through the ops' registered autograd. Then times the forward + backward step at the
benchmark's training shapes: CUDA events around eager steps (host time included where it is the
longer), CUDA-graph replay (device time alone), dense SDPA beside them; and profiles the public
step with cProfile, printing the functions with the most own time.

Runs it all twice in one process: with the Gluon kernels launched through Triton's JIT
(``JITFunction.run`` and validated descriptors at every call, as before
``fewstep.triton.direct_launch``) and through the direct path that fewstep uses.
Usage: ``python bench/local_window_attention_host_gpu.py [--out DIR]``; writes
``DIR/local_window_attention_host.json``."""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import gpu_median_ms, graph_replay_ms  # noqa: E402
from local_window_attention_tiles_gpu import training_inputs  # noqa: E402

import fewstep  # noqa: E402
from fewstep.triton import local_window_attention as lwa  # noqa: E402
from fewstep.triton.direct_launch import launch_through_jit  # noqa: E402

SIDE, N_TEXT, RADIUS = 64, 512, 8.0
CALLS = 40
STEP_SHAPES = [(64, 512, 16.0), (64, 512, 8.0), (128, 512, 16.0)]  # grid side, text tokens, radius


def host_us(fn) -> float:
    """Median over 5 rounds of the wall time per call of CALLS back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def step_times(side: int, n_text: int, radius: float) -> dict:
    """Forward + backward ms at one shape: eager events (public function, ops), graph replay, SDPA."""
    q, k, v, grad_out, pattern = training_inputs(side, n_text, radius)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def public():
        out = fewstep.local_window_attention(*leaves, grid=(side, side), n_text=n_text, radius=radius)
        torch.autograd.grad(out, leaves, grad_out)

    def through_ops():
        out = torch.ops.fewstep.local_window_attention_triton(*leaves, None, None, *pattern)[0]
        torch.autograd.grad(out, leaves, grad_out)

    def sdpa():
        torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, grad_out)
    row = dict(shape=f"{side}x{side}+{n_text} r={radius:g}", public_eager=gpu_median_ms(public),
               ops_eager=gpu_median_ms(through_ops), public_graph=graph_replay_ms(public),
               sdpa_eager=gpu_median_ms(sdpa))
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    direct_launch = lwa.direct_launch
    results = {}
    for round_ in range(2):  # interleaved: the host's speed drifts within a run
        for path, launcher in (("jit", launch_through_jit), ("direct", direct_launch)):
            lwa.direct_launch = launcher
            results[f"{path} (round {round_ + 1})"] = measure()
    lwa.direct_launch = direct_launch
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "local_window_attention_host.json"), "w") as f:
        json.dump(results, f, indent=1)


def measure() -> dict:
    q, k, v, grad_out, pattern = training_inputs(SIDE, N_TEXT, RADIUS)
    fwd = torch.ops.fewstep.local_window_attention_triton
    bwd = torch.ops.fewstep.local_window_attention_triton_backward
    out, lse = fwd(q, k, v, None, None, *pattern)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def public_forward():
        return fewstep.local_window_attention(*leaves, grid=(SIDE, SIDE), n_text=N_TEXT, radius=RADIUS)

    def step():
        torch.autograd.grad(public_forward(), leaves, grad_out)

    def op_step():
        torch.autograd.grad(torch.ops.fewstep.local_window_attention_triton(*leaves, None, None, *pattern)[0], leaves,
                            grad_out)

    with torch.no_grad():
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=f"{SIDE}x{SIDE}+{N_TEXT} r={RADIUS:g}",
                      forward_op_us=host_us(lambda: fwd(q, k, v, None, None, *pattern)),
                      backward_op_us=host_us(lambda: bwd(grad_out, q, k, v, None, None, out, lse, *pattern)),
                      public_forward_no_grad_us=host_us(public_forward))
    result["fwd_bwd_step_us"] = host_us(step)
    result["fwd_bwd_step_through_ops_us"] = host_us(op_step)
    result["steps_ms"] = [step_times(*shape) for shape in STEP_SHAPES]
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(CALLS):
        step()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    result["profile_top_tottime"] = text.getvalue()
    print(json.dumps({k: v for k, v in result.items() if k != "profile_top_tottime"}, indent=1))
    print(result["profile_top_tottime"])
    return result


if __name__ == "__main__":
    main()
