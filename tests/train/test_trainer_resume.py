"""Exact resume: K steps, a checkpoint, a SIGKILL, a new process that resumes to N steps — weights,
EMA, optimizer states and RNG-driven data end bit-identical to an uninterrupted N-step run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_distill  # noqa: E402

from fewstep.train import checkpoint as ckpt  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_distill.py")
N, K = 7, 3  # K odd: the resumed run starts on a step where only the student phase trains


def _run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _assert_same_state(a, b, what):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same_state(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def test_killed_run_resumes_bit_exactly(tmp_path):
    mixed_precision = "no"  # fp16 (GradScaler state) resumes in test_trainer.py, in one process
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    run_whole, run_killed = os.path.join(whole, "auto"), os.path.join(killed, "auto")  # the script's run dirs
    tiny_distill.main(["--out", whole, "--steps", str(N), "--checkpoint-every", str(N),
                       "--mixed-precision", mixed_precision])

    grad_accum = 2  # the script's default: batch index K * 2 is the first one after the checkpoint
    first = _run_script("--out", killed, "--steps", str(N), "--checkpoint-every", str(K),
                        "--kill-at", str(K * grad_accum), "--mixed-precision", mixed_precision)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert open(os.path.join(run_killed, "latest")).read().strip() == f"checkpoint-{K}"
    assert not os.path.exists(os.path.join(run_killed, "weights-rank0.pt"))

    second = _run_script("--out", killed, "--steps", str(N), "--checkpoint-every", str(N), "--resume",
                         "--mixed-precision", mixed_precision)
    assert second.returncode == 0, second.stderr

    _assert_same_tensors(torch.load(os.path.join(run_whole, "weights-rank0.pt")),
                         torch.load(os.path.join(run_killed, "weights-rank0.pt")), "final weights and EMA")
    final_whole = os.path.join(run_whole, f"checkpoint-{N}")
    final_killed = os.path.join(run_killed, f"checkpoint-{N}")
    _assert_same_state(ckpt.read(final_whole, "optimizers.pt"), ckpt.read(final_killed, "optimizers.pt"),
                       "optimizer and scaler states")
    _assert_same_state(ckpt.read(final_whole, "rng.pt"), ckpt.read(final_killed, "rng.pt"), "rng states")
    assert ckpt.read(final_killed, "trainer.json")["batches_drawn"] == N * grad_accum
    # the method-owned target network and its counter are part of the weights
    weights = torch.load(os.path.join(run_killed, "weights-rank0.pt"))
    assert int(weights["target_updates"]) == N
    assert not any(k.startswith("teacher.") for k in weights)
