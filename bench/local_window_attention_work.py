"""Where the local-window kernels' time goes, from a GPU run's results (no GPU needed): for each case
of bench/local_window_attention_gpu.py, the FLOPs the Triton kernels compute (whole tiles,
fewstep.triton.local_window_attention_work) beside the FLOPs the mask admits, the rate fewstep
reached on the computed work, dense SDPA's rate in the same run, the time the computed work would
take at SDPA's rate (the floor of these tiles at cuDNN's efficiency), and the rate each of issue 4's
targets needs.

FLOPs: 4·D per admitted pair and head for the forward, 14·D for forward + backward (the backward's
five products). The kernels compute 4·D per computed pair in the forward, 8·D in the dK/dV kernel
and 6·D in the dQ kernel (S and dP are recomputed in both).

Usage: ``python bench/local_window_attention_work.py RESULTS.json [--kernel-tiles F;KV;Q]
[--tiles TILES.json --run NAME]`` prints a markdown report. --kernel-tiles gives the tiles the run
used when they are not today's ``kernel_tiles`` (``ty,tx,ky,kx`` per kernel: forward; dK/dV; dQ);
TILES.json (bench/local_window_attention_tiles_gpu.py) adds the rates of the separate kernels where
it has their profiler times."""
from __future__ import annotations

import argparse
import functools
import heapq
import json
import re

import torch

from fewstep.triton.local_window_attention import KernelTiles, Tiles, kernel_tiles
from fewstep.triton.local_window_attention_work import kernel_programs, kernel_work

HEADS, HEAD_DIM, DTYPE = 24, 128, torch.bfloat16
# Issue 4's targets, as ratios to a baseline measured in the same run:
# (case, direction, baseline provider, speed-up over it)
TARGETS = [("64x64+512 r=16", "fwd+bwd", "flex raster (CLEAR)", 2.0),
           ("128x128+512 r=16", "fwd", "flex raster (CLEAR)", 4.0),
           ("128x128+512 r=16", "fwd+bwd", "flex raster (CLEAR)", 3.0),
           ("256x256+512 r=16", "fwd", "dense SDPA", 25.0)]


def parse_case(case: str) -> tuple[int, int, int, float]:
    h, w, n_text, radius = re.fullmatch(r"(\d+)x(\d+)\+(\d+) r=([\d.]+)", case).groups()
    return int(h), int(w), int(n_text), float(radius)


@functools.cache
def case_flops(case: str, tiles: KernelTiles) -> dict:
    """KernelWork.flops of a benchmark case at ``tiles``, for all heads."""
    h, w, n_text, radius = parse_case(case)
    return kernel_work((h, w), n_text, radius=radius, tiles=tiles).flops(HEAD_DIM, HEADS)


def dense_flops(n: int, direction: str) -> float:
    return (4 if direction == "fwd" else 14) * HEAD_DIM * HEADS * n * n


def report(results: dict, tiles: KernelTiles, kernel_ms: dict) -> str:
    times = {(r["case"], r["provider"]): r["median_ms"] for r in results["rows"]
             if r["suite"] == "local_window_attention"}
    cases = list(dict.fromkeys(case for case, _ in times))
    env, ceilings = results["env"], results.get("ceilings", {})
    lines = [f"# Local-window attention: computed work and floors — {env['gpu']}, {env['date']}", "",
             f"From `{results.get('_path', 'the results JSON')}` (torch {env['torch']}, Triton {env['triton']}; "
             f"bf16, B=1, {HEADS} heads, D={HEAD_DIM}); computed by `bench/local_window_attention_work.py`. "
             f"Measured ceilings of that run: bf16 matmul {ceilings.get('bf16_matmul_TFLOPs', float('nan')):.0f} "
             "TFLOP/s, copy "
             f"{ceilings.get('copy_GBps', float('nan')):.0f} GB/s. Kernel tiles (TY×TX queries / KY×KX keys): "
             + ", ".join(f"{name} {t.ty}×{t.tx} / {t.ky}×{t.kx}" for name, t in zip(tiles._fields, tiles)) + ".", "",
             "useful: FLOPs of the pairs the mask admits (4·D per pair forward, 14·D forward + backward). "
             "computed: FLOPs of the whole tiles the kernels compute (forward 4·D per pair, dK/dV 8·D, "
             "dQ 6·D). Rates are FLOPs over the measured median time. floor: computed FLOPs at dense SDPA's "
             "rate in the same run.", "",
             "| case | pass | fewstep ms | useful GFLOP | computed GFLOP | useful share | fewstep TFLOP/s on computed "
             "| dense SDPA TFLOP/s | floor ms at SDPA's rate |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        h, w, n_text, radius = parse_case(case)
        flops = case_flops(case, tiles)
        for direction in ("fwd", "fwd+bwd"):
            ours, dense = times.get((case, f"fewstep {direction}")), times.get((case, f"dense SDPA {direction}"))
            if ours is None or dense is None:
                continue
            computed = flops["forward"] + (flops["backward"] if direction == "fwd+bwd" else 0)
            useful = flops["useful_forward" if direction == "fwd" else "useful_forward_backward"]
            sdpa_rate = dense_flops(n_text + h * w, direction) / (dense * 1e-3)
            lines.append(f"| {case} | {direction} | {ours:.3f} | {useful / 1e9:.0f} | {computed / 1e9:.0f} | "
                         f"{useful / computed:.0%} | {computed / (ours * 1e-3) / 1e12:.0f} | {sdpa_rate / 1e12:.0f} | "
                         f"{computed / sdpa_rate * 1e3:.3f} |")
    lines += ["", "## Targets", "", "The rate on the computed work each target needs, at the kernels' present tiles.",
              "", "| case | pass | target | target ms | fewstep ms | needs TFLOP/s on computed | = share of dense "
              "SDPA's rate |", "|---|---|---|---|---|---|---|"]
    for case, direction, baseline, speedup in TARGETS:
        base, ours = times.get((case, f"{baseline} {direction}")), times.get((case, f"fewstep {direction}"))
        dense = times.get((case, f"dense SDPA {direction}"))
        if None in (base, ours, dense):
            continue
        h, w, n_text, radius = parse_case(case)
        flops = case_flops(case, tiles)
        computed = flops["forward"] + (flops["backward"] if direction == "fwd+bwd" else 0)
        target_ms = base / speedup
        needed = computed / (target_ms * 1e-3)
        sdpa_rate = dense_flops(n_text + h * w, direction) / (dense * 1e-3)
        lines.append(f"| {case} | {direction} | {speedup:g}x {baseline} | {target_ms:.3f} | {ours:.3f} | "
                     f"{needed / 1e12:.0f} | {needed / sdpa_rate:.0%} |")
    if kernel_ms:
        lines += ["", "## Backward kernels", "", "Profiler device times of each kernel (tile sweep run) over the "
                  "work it computes.", "", "| case | kernel | ms | computed GFLOP | TFLOP/s on computed |",
                  "|---|---|---|---|---|"]
        for (case, kernel), ms in kernel_ms.items():
            work = case_flops(case, tiles)
            name = kernel.removesuffix("_kernel")
            if name in work:
                lines.append(f"| {case} | {kernel} | {ms:.3f} | {work[name] / 1e9:.0f} | "
                             f"{work[name] / (ms * 1e-3) / 1e12:.0f} |")
    return "\n".join(lines) + "\n"


def makespan(lengths: list, slots: int) -> int:
    """Finish time of programs of the given lengths handed in order to the first free of ``slots``
    (the GPU's block scheduler, every iteration costing the same)."""
    free = [0] * slots
    end = 0
    for length in lengths:
        start = heapq.heappop(free)
        end = max(end, start + length)
        heapq.heappush(free, start + length)
    return end


def launch_order_model(cases: list, tiles: KernelTiles, slots: int) -> str:
    """Markdown: for each case and kernel, the predicted time above a perfect split of the work for
    the head-major launch (each head's long blocks, then its image tiles) and for a launch with the
    long blocks of all heads first."""
    lines = ["", f"## Launch order (model: {slots} concurrent programs, every iteration the same cost)", "",
             "Time above a perfect split of the iterations over the concurrent programs.", "",
             "| case | kernel | head-major | long blocks of all heads first |", "|---|---|---|---|"]
    for case in cases:
        h, w, n_text, radius = parse_case(case)
        for kernel in ("forward", "kv_grad", "q_grad"):
            programs = kernel_programs(kernel, (h, w), n_text, radius=radius, tiles=tiles)
            head_major = (programs.long + programs.image) * HEADS
            long_first = [n for n in programs.long for _ in range(HEADS)] + programs.image * HEADS
            ideal = sum(head_major) / slots
            lines.append(f"| {case} | {kernel} | {makespan(head_major, slots) / ideal - 1:+.0%} | "
                         f"{makespan(long_first, slots) / ideal - 1:+.0%} |")
    return "\n".join(lines) + "\n"


def tile_run_kernel_ms(path: str, run: str) -> dict:
    """{(case, kernel): ms} from a tile-sweep JSON's run (its rows with profiler times)."""
    with open(path) as f:
        rows = json.load(f)["runs"][run]
    return {(f"{r['grid']} r={r['radius']:g}", kernel): ms
            for r in rows if "kernel_ms" in r for kernel, ms in r["kernel_ms"].items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--kernel-tiles", help="tiles the run used, e.g. '8,8,8,8;2,16,4,16;8,8,8,8' "
                        "(forward; dK/dV; dQ), default: kernel_tiles today")
    parser.add_argument("--tiles", help="a tile-sweep JSON with per-kernel profiler times")
    parser.add_argument("--run", help="the tile-sweep run to read")
    parser.add_argument("--slots", type=int, default=264,
                        help="concurrent programs for the launch-order model (H200: 132 SMs x 2 programs)")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    results["_path"] = args.results
    tiles = kernel_tiles(HEAD_DIM, DTYPE)
    if args.kernel_tiles:
        tiles = KernelTiles(*(Tiles(*map(int, spec.split(",")), tiles[0].num_warps, tiles[0].num_stages)
                              for spec in args.kernel_tiles.split(";")))
    print(report(results, tiles, tile_run_kernel_ms(args.tiles, args.run) if args.tiles else {}), end="")
    cases = list(dict.fromkeys(r["case"] for r in results["rows"] if r["suite"] == "local_window_attention"))
    print(launch_order_model(cases, tiles, args.slots), end="")


if __name__ == "__main__":
    main()
