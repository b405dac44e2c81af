"""The trainer on CUDA: no host syncs between log steps, bf16 training lowers the loss, and a resumed
run (CUDA RNG state included) continues bit-exactly."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import HAS_CUDA, count_host_syncs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
from tiny_distill import TinyDistill, make_data  # noqa: E402

from fewstep.train import Trainer  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")


def _trainer(method, **kwargs):
    # the batches are drawn by the trainer's CUDA generator: data is born on the device
    return Trainer(method, make_data(32), device="cuda", progress=False, mixed_precision="bf16", clip_grad_norm=1.0,
                   lr={"student": 3e-3, "critic": 1e-2}, ema={"student": (method.student, 0.9)}, **kwargs)


def _syncs_while_training(max_steps: int, log_every: int) -> int:
    torch.manual_seed(0)
    method = TinyDistill()
    trainer = _trainer(method, max_steps=max_steps, log_every=log_every)
    trainer.train_step()  # first-call allocations and lazy inits stay outside the count
    return count_host_syncs(trainer.train)


def test_host_syncs_happen_only_at_log_steps():
    one_log = _syncs_while_training(max_steps=4, log_every=4)      # steps 2-4 trained, a log at 4
    three_logs = _syncs_while_training(max_steps=12, log_every=4)  # steps 2-12, logs at 4, 8 and 12
    assert one_log >= 1  # the log's one read of the device is seen
    assert three_logs == 3 * one_log, (one_log, three_logs)


def test_bf16_training_lowers_the_loss_on_cuda():
    torch.manual_seed(0)
    method = TinyDistill(with_target=False)
    trainer = _trainer(method, max_steps=10, log_every=10)
    first = trainer.train().last_log["phases"]["student"]["loss"]   # mean over steps 1-10
    trainer.max_steps = 80
    last = trainer.train().last_log["phases"]["student"]["loss"]    # mean over steps 71-80
    assert method.student[0].weight.is_cuda and last < 0.5 * first


def test_resume_on_cuda_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    whole = TinyDistill()
    _trainer(whole, max_steps=6).train()
    torch.manual_seed(0)
    _trainer(TinyDistill(), max_steps=3, checkpoint_every=3, out_dir=str(tmp_path)).train()
    torch.manual_seed(0)
    resumed = TinyDistill()
    _trainer(resumed, max_steps=6, out_dir=str(tmp_path)).resume().train()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
