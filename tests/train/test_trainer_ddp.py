"""Data parallel training on CPU: ``torchrun --standalone --nproc_per_node=2`` (gloo) trains the tiny
method with DDP and then with FSDP2 (``fully_shard``) in the same two processes; both ranks end with
the same weights, equal (to float32 rounding of the gradient average) to one process trained on
both ranks' batches at once."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from fewstep.train import checkpoint as ckpt

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_distill.py")
# with the EMA target network: sharded like the student under FSDP2, replicated under DDP
COMMON = ["--steps", "4", "--batch", "3", "--grad-accum", "2", "--checkpoint-every", "4"]


def _weights(run_dir, rank):
    return torch.load(os.path.join(run_dir, f"weights-rank{rank}.pt"))


def test_two_ranks_match_one_process_on_the_doubled_batch(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
         "--out", multi, *COMMON, "--parallel", "ddp,fsdp2"],
        capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert torchrun.returncode == 0, torchrun.stdout[-3000:] + torchrun.stderr[-3000:]
    one = subprocess.run([sys.executable, SCRIPT, "--out", single, *COMMON, "--ranks-in-one", "2",
                          "--parallel", "none"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]

    reference = _weights(os.path.join(single, "none"), 0)
    assert any(k.startswith("ema/") for k in reference) and any(k.startswith("critic.") for k in reference)
    for parallel in ("ddp", "fsdp2"):
        run = os.path.join(multi, parallel)
        rank0, rank1 = _weights(run, 0), _weights(run, 1)
        assert rank0.keys() == rank1.keys() == reference.keys(), parallel
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{parallel} {key}: ranks differ"
            # 4 AdamW steps of lr <= 1e-2 on gradients that differ by float32 rounding of the average
            torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{parallel} {key}")
        # only rank 0 logs and checkpoints; the checkpoint holds whole (gathered) tensors
        saved = ckpt.read(os.path.join(run, "checkpoint-4"), "model.safetensors")
        assert saved.keys() == {k for k in rank0 if not k.startswith("ema/")}
        for key, value in saved.items():
            assert torch.equal(value, rank0[key]), f"{parallel} {key}"
        with open(os.path.join(run, "log.jsonl")) as f:
            assert len(f.readlines()) == 2
