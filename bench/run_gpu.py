"""Runs fewstep's whole GPU benchmark suite in one process and writes
``<out>/<date>-<gpu>.json`` and ``.md``.  Usage: ``python bench/run_gpu.py [--out DIR] [--only SUITE]``."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adamw_gpu  # noqa: E402
import common  # noqa: E402
import clear_gpu  # noqa: E402
import distill_losses_gpu  # noqa: E402
import distill_methods_gpu  # noqa: E402
import dmd_loss_gpu  # noqa: E402
import ema_gpu  # noqa: E402
import lcd_guided_gpu  # noqa: E402
import local_window_attention_gpu  # noqa: E402
import sampler_step_gpu  # noqa: E402
import samplers_gpu  # noqa: E402
import sara_gpu  # noqa: E402
import trainer_gpu  # noqa: E402

SUITES = {"sampler_step": lambda rec, c: sampler_step_gpu.run(rec, c["copy_GBps"]),
          "loop4": lambda rec, c: samplers_gpu.run(rec),
          "sara": lambda rec, c: sara_gpu.run(rec, c["copy_GBps"]),
          "ema": lambda rec, c: ema_gpu.run(rec, c["copy_GBps"]),
          "dmd_loss": lambda rec, c: dmd_loss_gpu.run(rec),
          "trainer": lambda rec, c: trainer_gpu.run(rec, c["copy_GBps"]),
          "distill_methods": lambda rec, c: distill_methods_gpu.run(rec),
          "distill_losses": lambda rec, c: distill_losses_gpu.run(rec),
          "lcd_guided": lambda rec, c: lcd_guided_gpu.run(rec),
          "adamw": lambda rec, c: adamw_gpu.run(rec, c["copy_GBps"]),
          "clear": lambda rec, c: clear_gpu.run(rec),
          "local_window_attention": lambda rec, c: local_window_attention_gpu.run(rec),
          # the training shape only (64x64 + 512, r=16): one case of the suite above, for a short device call
          "local_window_attention_training": lambda rec, c: local_window_attention_gpu.run(
              rec, local_window_attention_gpu.CASES[:1]),
          "local_window_attention_models": lambda rec, c: local_window_attention_gpu.run(
              rec, local_window_attention_gpu.MODEL_CASES)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--only", choices=sorted(SUITES), action="append")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("run_gpu.py: no CUDA device")
    import fewstep
    print("fewstep build:", fewstep.build_info(), flush=True)
    rec = common.Recorder()
    ceilings = {"copy_GBps": common.copy_bandwidth_gbs(), "bf16_matmul_TFLOPs": common.matmul_tflops()}
    print("ceilings:", ceilings, flush=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    suffix = "-" + "-".join(args.only) if args.only else ""
    stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{gpu}{suffix}")
    os.makedirs(args.out, exist_ok=True)
    rec.on_add = lambda: write(rec, stem, ceilings)  # after every row: a run cut short keeps what it measured
    for name in args.only or SUITES:
        SUITES[name](rec, ceilings)
    print("wrote", stem + ".json", flush=True)


def write(rec, stem, ceilings):
    rec.write(stem + ".json", stem + ".md", ceilings,
              notes="pct_of_copy_bw: bytes the step must move (inputs read once, outputs written once) over "
                    "the median time, as a share of the copy bandwidth above. loop4 times are host wall time "
                    "of a whole 4-step loop (launch overhead included), the model outputs precomputed. sara_train times are "
                    "CUDA-event medians of whole training steps (forward, backward, optimizer step, zero_grad); "
                    "peak_GiB is torch.cuda.max_memory_allocated over the timed steps minus what was allocated before the config was built. "
                    "dmd_loss times are forward + backward; transient_buffers is the peak above the inputs and x.grad, "
                    "in input-sized buffers. trainer_opt_ema: optimizer step + EMA over SD1.5 shapes (40 B/param in two "
                    "passes, 36 B/param folded); trainer_step: host wall time of one training step. "
                    "distill_methods: CUDA-event medians of one phase's loss + backward against the same "
                    "model passes written by hand (overhead_pct: what the method adds). "
                    "lcd_guided: CUDA-event medians of one LCD / LCM-LoRA / guided-distillation training step (loss, backward, "
                    "EMA) against the same model passes written by hand. "
                    "distill_losses times are forward + backward of each loss head (LCD: the "
                    "teacher step under no_grad, then the consistency loss). "
                    "adamw pct_of_floor: the one-pass traffic floor (36 B per fp32 "
                    "parameter for AdamW + EMA, 28 B for AdamW alone) at the copy bandwidth over the median time. "
                    "clear_layer: one FLUX single-stream attention layer (projections, "
                    "RoPE, attention), x_dense = the dense layer's time over the row's. local_window_attention: "
                    "useful_TFLOPs counts only the query-key pairs the mask admits, 4·D FLOPs per pair forward "
                    "and 14·D forward + backward (dense SDPA: all pairs); computed_TFLOPs counts the pairs "
                    "fewstep's kernels compute (whole tiles; 4·D forward, 8·D dK/dV, 6·D dQ); "
                    "'fewstep first call' is the wall time of the first call at a new resolution, with the "
                    "number of Triton kernels it compiled.")


if __name__ == "__main__":
    main()
