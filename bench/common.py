"""Timing and result-recording helpers shared by fewstep's GPU benchmarks."""
from __future__ import annotations

import datetime
import json
import statistics
import time
from typing import Callable

import torch


def gpu_median_ms(fn: Callable[[], object], warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median device time of ``fn`` (CUDA events, L2 flushed between runs) via triton.testing.do_bench."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_replay_ms(fn: Callable[[], object], warmup_calls: int = 2) -> float:
    """Device time of ``fn`` alone: warmed up on a side stream, captured once as a CUDA graph and
    replayed, so host work (Python, dispatch, argument checks) is left out."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return gpu_median_ms(graph.replay)


def host_median_ms(fn: Callable[[], object], warmup: int = 20, reps: int = 200) -> float:
    """Median wall time of ``fn`` from launch to completion: includes Python and launch overhead,
    which dominate loops of small kernels (a synchronize brackets each run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_median_ms(fn: Callable[[], object], reps: int = 7) -> float:
    """Median wall time of ``fn`` on the CPU over ``reps`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = gpu_median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = gpu_median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


class Recorder:
    """Collects rows ``suite, case, provider, dtype, median_ms, metric_name, metric_value, gpu, torch,
    triton, date`` and writes them as JSON and a markdown table."""

    def __init__(self):
        import triton
        self.env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": triton.__version__, "date": datetime.date.today().isoformat()}
        self.rows: list[dict] = []
        self.on_add = None  # called after every row: run_gpu.py rewrites its files, so a run cut short keeps them

    def add(self, suite, case, provider, dtype, median_ms, metric_name="", metric_value=None):
        row = {"suite": suite, "case": case, "provider": provider, "dtype": str(dtype).replace("torch.", ""),
               "median_ms": round(median_ms, 5), "metric_name": metric_name,
               "metric_value": None if metric_value is None else round(metric_value, 4), **self.env}
        self.rows.append(row)
        print(f"{suite:14s} {case:34s} {provider:22s} {row['dtype']:9s} {median_ms:9.4f} ms  "
              f"{metric_name} {'' if metric_value is None else f'{metric_value:.3f}'}", flush=True)
        if self.on_add is not None:
            self.on_add()

    def write(self, json_path, md_path, ceilings: dict, notes: str = ""):
        with open(json_path, "w") as f:
            json.dump({"env": self.env, "ceilings": ceilings, "rows": self.rows}, f, indent=1)
        lines = [f"# fewstep GPU benchmarks — {self.env['gpu']}, {self.env['date']}", "",
                 f"torch {self.env['torch']}, triton {self.env['triton']}. Ceilings measured in this run: "
                 + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()) + ".", ""]
        if notes:
            lines += [notes, ""]
        lines += ["| suite | case | provider | dtype | median ms | metric | value |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            v = "" if r["metric_value"] is None else f"{r['metric_value']:.3f}"
            lines.append(f"| {r['suite']} | {r['case']} | {r['provider']} | {r['dtype']} | {r['median_ms']:.4f} | "
                         f"{r['metric_name']} | {v} |")
        with open(md_path, "w") as f:
            f.write("\n".join(lines) + "\n")
