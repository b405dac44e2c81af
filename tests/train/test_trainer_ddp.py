"""Data parallel training on CPU: ``torchrun --standalone --nproc_per_node=2`` (gloo) of the tiny
method gives both ranks the same weights, equal (to float32 rounding of the gradient average) to one
process training on both ranks' batches at once; FSDP2 (``fully_shard``) likewise."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_distill.py")
COMMON = ["--steps", "4", "--batch", "3", "--grad-accum", "2", "--checkpoint-every", "4"]


def _torchrun(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           "--out", out, *COMMON, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _single(out, *args):
    result = subprocess.run([sys.executable, SCRIPT, "--out", out, *COMMON, "--ranks-in-one", "2",
                             "--parallel", "none", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(out, rank):
    return torch.load(os.path.join(out, f"weights-rank{rank}.pt"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process_on_the_doubled_batch(tmp_path, parallel):
    extra = ["--no-target"] if parallel == "fsdp2" else []
    multi, single = str(tmp_path / parallel), str(tmp_path / "single")
    _torchrun(multi, "--parallel", parallel, *extra)
    _single(single, *extra)
    rank0, rank1, reference = _weights(multi, 0), _weights(multi, 1), _weights(single, 0)
    assert rank0.keys() == rank1.keys() == reference.keys()
    assert any(k.startswith("ema/") for k in rank0) and any(k.startswith("critic.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: ranks differ"
        # 4 AdamW steps of lr <= 1e-2 on gradients that differ by float32 rounding of the average
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{key}")
    # only rank 0 writes logs and checkpoints; the checkpoint holds whole (gathered) tensors
    assert os.path.isfile(os.path.join(multi, "checkpoint-4", "model.safetensors"))
    from fewstep.train import checkpoint as ckpt
    saved = ckpt.read(os.path.join(multi, "checkpoint-4"), "model.safetensors")
    for key, value in saved.items():
        assert torch.equal(value, rank0[key]), key
    with open(os.path.join(multi, "log.jsonl")) as f:
        assert len(f.readlines()) == 2
