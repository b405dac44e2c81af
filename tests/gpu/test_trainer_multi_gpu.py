"""The trainer on two GPUs (nccl): ``torchrun --nproc_per_node=2`` with DDP and then FSDP2 gives both
ranks the same weights as one GPU process trained on both ranks' batches (skipped with fewer GPUs)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train", "tiny_distill.py")
COMMON = ["--steps", "4", "--batch", "3", "--grad-accum", "2", "--checkpoint-every", "4"]


def test_two_gpus_match_one_gpu_on_the_doubled_batch(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          SCRIPT, "--out", multi, *COMMON, "--parallel", "ddp,fsdp2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one = subprocess.run([sys.executable, SCRIPT, "--out", single, *COMMON, "--ranks-in-one", "2", "--parallel", "none"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = torch.load(os.path.join(single, "none", "weights-rank0.pt"))
    for parallel in ("ddp", "fsdp2"):
        rank0 = torch.load(os.path.join(multi, parallel, "weights-rank0.pt"))
        rank1 = torch.load(os.path.join(multi, parallel, "weights-rank1.pt"))
        for key in reference:
            assert torch.equal(rank0[key], rank1[key]), f"{parallel} {key}: ranks differ"
            torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{parallel} {key}")
