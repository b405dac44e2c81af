"""``fewstep demo``: distill a diffusion teacher into 1–4 step students and measure them.

On its embedded default it trains a small class-conditional teacher on a 2-D Gaussian mixture
(and on scikit-learn's 8×8 digits when scikit-learn is installed), distills it with LCD, DMD2,
BOOT and guided distillation, samples every model, and scores each by the sliced Wasserstein-2
distance of its samples to held-out data — next to the *floor*, the same distance between two
held-out halves. It prints a table and writes ``results.json``, ``samples.png`` and ``report.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fewstep
from fewstep.demo import data as demo_data
from fewstep.demo import figure, recipes


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_dataset(ds: demo_data.Dataset, config: recipes.Config, device: torch.device, log=print) -> dict:
    floor = demo_data.sliced_wasserstein2(*ds.halves())
    log(f"\n== {ds.name}: {ds.train_x.shape[0]} training points of dimension {ds.dim}, "
        f"{ds.eval_size} held-out points per half; floor (held-out half vs half) = {floor:.4f}")
    start = time.perf_counter()
    teacher = recipes.train_teacher(ds, config, device, log)
    log(f"  teacher trained in {time.perf_counter() - start:.0f} s")
    runs, panels = recipes.evaluate_teacher(teacher, ds, config, device)
    for name, distill in recipes.METHODS.items():
        start = time.perf_counter()
        method_runs, method_panels = distill(teacher, ds, config, device, log)
        log(f"  {name} distilled in {time.perf_counter() - start:.0f} s")
        runs += method_runs
        panels += method_panels
    return {"dataset": ds.name, "metric": "sliced_wasserstein2", "floor": floor, "runs": runs,
            "panels": panels}


def _table(result: dict) -> str:
    floor = result["floor"]
    teacher50 = next(r for r in result["runs"] if r["model"] == "teacher" and r["steps"] == 50)
    gap50 = teacher50["metric"] - floor
    lines = [f"dataset {result['dataset']}: sliced W2 to held-out data (floor {floor:.4f}; gap = metric - floor)",
             f"| model | sampler | steps | NFE | seconds | SW2 | gap | gap / teacher-50 gap |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        gap = r["metric"] - floor
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['seconds']:.3f} | "
                     f"{r['metric']:.4f} | {gap:.4f} | {gap / gap50:.2f} |")
    return "\n".join(lines)


def _targets(result: dict) -> list[tuple[str, bool, str]]:
    """The quality targets, as (what, met, measured)."""
    floor = result["floor"]
    by = {(r["model"], r["steps"]): r["metric"] - floor for r in result["runs"]}
    gap50 = by[("teacher", 50)]
    checks = [("teacher at 1 step at least 5x worse than at 50", ("teacher", 1), 5.0, ">=")]
    checks += [("DMD2 at 1 step within 1.5x the 50-step teacher's gap", ("dmd2", 1), 1.5, "<="),
               ("LCD at 4 steps within 2x the 50-step teacher's gap", ("lcd", 4), 2.0, "<=")]
    out = []
    for what, key, bound, op in checks:
        if key not in by:
            continue
        ratio = by[key] / gap50
        met = ratio >= bound if op == ">=" else ratio <= bound
        out.append((what, met, f"{ratio:.2f}x"))
    return out


def write_outputs(results: list[dict], out_dir: str, seconds: float, device: torch.device) -> None:
    os.makedirs(out_dir, exist_ok=True)
    primary = {k: v for k, v in results[0].items() if k != "panels"}
    primary["other_datasets"] = [{k: v for k, v in r.items() if k != "panels"} for r in results[1:]]
    primary["device"] = str(device)
    primary["total_seconds"] = seconds
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(primary, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "results.json"))

    rows = [[(caption, panel) for caption, panel in r["panels"]] for r in results]
    figure.write_png(os.path.join(out_dir, "samples.png"), figure.compose(rows))

    lines = ["# fewstep demo report", "",
             f"fewstep {fewstep.__version__}, torch {torch.__version__}, {device} "
             f"({platform.processor() or platform.machine()}), {seconds:.0f} s in all.", "",
             "Metric: sliced Wasserstein-2 distance (512 fixed random directions) between generated samples and "
             "held-out data, with the classes of the held-out points; floor: the same distance between two "
             "held-out halves. `seconds` is the wall time to generate the evaluation samples.", ""]
    for r in results:
        lines += [_table(r), "", "Targets:"]
        lines += [f"- {what}: {'met' if met else 'NOT met'} ({measured})" for what, met, measured in _targets(r)]
        lines.append("")
    lines.append("![samples](samples.png)")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def run(out_dir: str = "fewstep-demo", device: str = "auto", datasets=("mixture2d", "digits"),
        quick: bool = False, seed: int = 0, log=print) -> list[dict]:
    dev = _device(device)
    start = time.perf_counter()
    log(f"fewstep {fewstep.__version__} demo on {dev} (build: {fewstep.build_info()})")
    results = []
    for name in datasets:
        try:
            ds = demo_data.load(name, seed=seed)
        except ImportError as e:
            log(f"\n== {name}: skipped ({e})")
            continue
        config = recipes.config_for(name, quick=quick, seed=seed)
        results.append(run_dataset(ds, config, dev, log))
        log("\n" + _table(results[-1]))
        for what, met, measured in _targets(results[-1]):
            log(f"  {'met    ' if met else 'NOT MET'}  {what}: {measured}")
    seconds = time.perf_counter() - start
    write_outputs(results, out_dir, seconds, dev)
    log(f"\nwrote {out_dir}/results.json, samples.png and report.md ({seconds:.0f} s)")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fewstep demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fewstep-demo", help="output directory (default: ./fewstep-demo)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--datasets", default="mixture2d,digits",
                        help=f"comma-separated, from {list(demo_data.DATASETS)}")
    parser.add_argument("--quick", action="store_true", help="a few training steps each (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = tuple(n for n in args.datasets.split(",") if n)
    unknown = [n for n in names if n not in demo_data.DATASETS]
    if unknown or not names:
        parser.error(f"--datasets: expected names from {list(demo_data.DATASETS)}, got {args.datasets!r}")
    run(args.out, args.device, names, args.quick, args.seed)
