"""DDP and FSDP2 code paths in this process, on a one-rank gloo group: wrapping, attribute access
through the wrapper, checkpoint names without wrapper prefixes, exact resume (FSDP2: gathered
weights and full optimizer state) and the error for a method that bypasses its DDP wrapper."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_distill import TinyDistill, make_data  # noqa: E402

import fewstep  # noqa: E402
from fewstep.distill import DistillationMethod  # noqa: E402
from fewstep.train import Trainer  # noqa: E402
from fewstep.train import checkpoint as ckpt  # noqa: E402


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trainer(method, parallel, **kwargs):
    kwargs = {"max_steps": 5, "grad_accum": 2, "mixed_precision": "no", "progress": False, "parallel": parallel,
              "lr": {"student": 3e-3, "critic": 1e-2}, "ema": {"student": (method.student, 0.8)}, **kwargs}
    return Trainer(method, make_data(4), **kwargs)


def _method(parallel):
    torch.manual_seed(1234)
    return TinyDistill()  # with its EMA target: sharded like the student under FSDP2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_wrapped_training_resumes_exactly(one_rank_group, tmp_path, parallel):
    method = _method(parallel)
    method.student.config = {"hidden": 12}  # an attribute methods may read through the wrapper
    whole = _trainer(method, parallel)
    whole.train()
    if parallel == "ddp":
        assert type(method.student).__name__ == "_DDP" and method.student.config == {"hidden": 12}
    part = _trainer(_method(parallel), parallel, max_steps=5, checkpoint_every=3, out_dir=str(tmp_path / "run"))
    part.max_steps = 3
    part.train()
    saved = ckpt.read(str(tmp_path / "run" / "checkpoint-3"), "model.safetensors")
    assert "student.0.weight" in saved and not any(".module." in k for k in saved)
    resumed = _trainer(_method(parallel), parallel, out_dir=str(tmp_path / "run")).resume()
    resumed.train()
    a, b = whole.model_state_dict(), resumed.model_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, value in whole.ema_state_dict("student").items():
        assert torch.equal(value, resumed.ema_state_dict("student")[key]), key


class _Bypass(TinyDistill):
    """Keeps a reference to the student taken before the trainer wrapped it."""

    def __init__(self):
        super().__init__(with_target=False)
        self.__dict__["raw_student"] = self.student  # not a submodule: invisible to the wrap

    def loss(self, phase, batch, step):
        if phase == "critic":
            return super().loss(phase, batch, step)
        x = torch.cat([batch["x0"], batch["t"]], dim=1)
        return self.raw_student(x).pow(2).mean(), {}


def test_a_method_that_bypasses_its_ddp_wrapper_is_refused(one_rank_group):
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"method.student received gradients in phase 'student' without a "
                                           r"forward through its DDP wrapper"):
        _trainer(_Bypass(), "ddp", ema=None).train()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))

    def forward(self, x_t, t):
        return self.body(torch.cat([x_t, t.to(x_t.dtype)[:, None] / 1000], dim=1))


class _SharedDenoisers(DistillationMethod):
    """A student Denoiser and a teacher Denoiser over the same network (LoRA-style LCD, where the
    teacher is the student's base): the teacher is not wrapped, and its weights are saved once,
    under the student's names."""
    phases = ("student",)

    def __init__(self):
        super().__init__()
        net = _Net()
        self.teacher = fewstep.Denoiser(net, "eps")
        self.student = fewstep.Denoiser(net, "eps")

    def parameters_of(self, phase):
        return list(self.student.model.parameters())

    def loss(self, phase, batch, step):
        x0, noise = batch["x0"], batch["noise"]
        t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
        x_t = self.teacher.add_noise(x0, noise, t)
        with torch.no_grad():
            teacher_x0 = self.teacher(x_t, t).x0
        pred = self.student(x_t, t)
        return torch.nn.functional.mse_loss(pred.eps, noise) + 0.1 * torch.nn.functional.mse_loss(pred.x0, teacher_x0), {}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_denoiser_students_are_wrapped_inside_and_shared_weights_saved_once(one_rank_group, tmp_path, parallel):
    def trainer(**kwargs):
        torch.manual_seed(0)
        return Trainer(_SharedDenoisers(), make_data(4), max_steps=4, mixed_precision="no", progress=False,
                       parallel=parallel, **kwargs)

    whole = trainer()
    whole.train()
    if parallel == "ddp":
        assert type(whole.method.student.model).__name__ == "_DDP"
        assert type(whole.method.teacher.model).__name__ == "_Net"
    part = trainer(checkpoint_every=2, out_dir=str(tmp_path))
    part.max_steps = 2
    part.train()
    saved = ckpt.read(str(tmp_path / "checkpoint-2"), "model.safetensors")
    assert sorted(saved) == ["student.model.body.0.bias", "student.model.body.0.weight",
                             "student.model.body.2.bias", "student.model.body.2.weight"]
    resumed = trainer(out_dir=str(tmp_path)).resume()
    resumed.train()
    a, b = whole.model_state_dict(), resumed.model_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
