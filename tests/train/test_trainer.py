"""Trainer behaviour in one process: learning, gradient accumulation, EMA (own pass and folded into
the optimizer), mixed precision, logs, checkpoints, resume from an iterable, and bad input."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_distill import DIM, TinyDistill, make_data  # noqa: E402

import fewstep  # noqa: E402
from fewstep.train import Trainer, fold_ema  # noqa: E402


def _method(with_target=True):
    torch.manual_seed(1234)
    return TinyDistill(with_target=with_target)


def _trainer(method, data=None, **kwargs):
    kwargs = {"max_steps": 6, "mixed_precision": "no", "progress": False, "lr": {"student": 3e-3, "critic": 1e-2},
              **kwargs}
    return Trainer(method, data if data is not None else make_data(5), **kwargs)


def _student_mse(method, gen_seed=99):
    gen = torch.Generator().manual_seed(gen_seed)
    batch = {k: v for k, v in make_data(64)(0, gen).items()}
    with torch.no_grad():
        loss, logs = method.loss("student", batch, 0)
    return float(logs["mse"])


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_training_lowers_the_student_loss(mixed_precision):
    method = _method(with_target=False)
    before = _student_mse(method)
    _trainer(method, max_steps=60, mixed_precision=mixed_precision, lr=1e-2).train()
    assert _student_mse(method) < 0.5 * before


def test_autocast_dtype_reaches_the_method():
    seen = []

    class Recording(TinyDistill):
        def loss(self, phase, batch, step):
            loss, logs = super().loss(phase, batch, step)
            if phase == "student":
                x = torch.cat([batch["x0"], batch["t"]], dim=1)
                seen.append(self.student(x).dtype)
            return loss, logs

    torch.manual_seed(0)
    trainer = _trainer(Recording(), max_steps=1, mixed_precision="bf16")
    trainer.train()
    assert seen == [torch.bfloat16] and not trainer.scalers
    assert set(_trainer(Recording(), max_steps=1, mixed_precision="fp16").scalers) == {"student", "critic"}


def test_grad_accumulation_equals_the_whole_batch():
    gen = torch.Generator().manual_seed(3)
    whole = [make_data(6)(i, gen) for i in range(4)]
    halves = [{k: v[s] for k, v in b.items()} for b in whole for s in (slice(0, 3), slice(3, 6))]
    a, b = _method(), _method()
    _trainer(a, whole, max_steps=4, clip_grad_norm=0.5).train()
    _trainer(b, halves, max_steps=4, grad_accum=2, clip_grad_norm=0.5).train()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_follows_the_student_after_each_of_its_steps():
    snapshots = []

    class Snapshots(TinyDistill):
        def after_step(self, phase, step):
            super().after_step(phase, step)
            if phase == "student":
                snapshots.append([p.detach().double().clone() for p in self.student.parameters()])

    torch.manual_seed(0)
    method = Snapshots()
    expected = [p.detach().double().clone() for p in method.student.parameters()]
    trainer = _trainer(method, ema={"student": (method.student, 0.75)}, max_steps=5)
    trainer.train()
    for params in snapshots:
        expected = [0.75 * e + 0.25 * p for e, p in zip(expected, params)]
    got = trainer.ema_state_dict("student")
    for (name, _), want in zip(method.student.named_parameters(), expected):
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6, msg=name)


class _AdamWKeepingEMA(torch.optim.AdamW):
    """The interface fewstep.optim.FusedAdamW offers the trainer (a per-group "ema_decay",
    ``ema_parameters()`` in parameter order over the groups that have one), so that fold_ema is
    tested whether or not that optimizer is installed; its EMA runs after its own step."""

    def __init__(self, params, lr, ema_decay):
        self._ema = {}
        super().__init__(params, lr=lr)
        self.param_groups[0]["ema_decay"] = ema_decay

    def _ema_of(self, p):
        return self._ema.setdefault(id(p), p.detach().float().clone())

    def ema_parameters(self):
        return [self._ema_of(p) for g in self.param_groups if g.get("ema_decay") is not None for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            if group.get("ema_decay") is not None:
                for p in group["params"]:
                    self._ema_of(p).lerp_(p.float(), 1 - group["ema_decay"])


def test_an_optimizer_that_keeps_the_ema_takes_it_over(monkeypatch):
    calls = []
    monkeypatch.setattr(fewstep, "ema_update_", lambda *a: calls.append(a))
    method = _method()
    factory = lambda phase, params, lr: _AdamWKeepingEMA(params, lr, ema_decay=0.75)  # noqa: E731
    trainer = _trainer(method, optimizers=factory, ema={"student": (method.student, 0.75)}, max_steps=4)
    assert trainer.ema["student"].folded
    initial = {k: v.clone() for k, v in trainer.ema_state_dict("student").items()}
    trainer.train()
    # only the method's own target update called ema_update_: the trainer ran no EMA pass
    assert len(calls) == 4
    opt = trainer.optimizers["student"]
    for (name, _), copy in zip(method.student.named_parameters(), opt.ema_parameters()):
        assert trainer.ema_state_dict("student")[name] is copy
        assert not torch.equal(copy, initial[name])


def test_fold_ema_declines_what_it_cannot_fold():
    p = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4))]
    assert fold_ema(torch.optim.AdamW(p), p, 0.9) is None                       # keeps no EMA
    assert fold_ema(_AdamWKeepingEMA(p, 1e-3, 0.99), p, 0.9) is None           # another decay
    assert fold_ema(_AdamWKeepingEMA(p[:1], 1e-3, 0.9), p, 0.9) is None        # not all params
    opt = _AdamWKeepingEMA(p[::-1], 1e-3, 0.9)
    assert fold_ema(opt, p, 0.9) == opt.ema_parameters()[::-1]                  # in the params' order
    extra = nn.Parameter(torch.randn(5))
    opt = _AdamWKeepingEMA([extra], 1e-3, None)                                 # a group without EMA first
    opt.add_param_group({"params": p, "ema_decay": 0.9})
    assert fold_ema(opt, p, 0.9) == opt.ema_parameters()
    assert fold_ema(opt, [extra], 0.9) is None


def test_fused_adamw_takes_over_the_ema_and_resumes(tmp_path):
    pytest.importorskip("fewstep.optim")
    method = _method()
    kwargs = {"optimizers": "fused_adamw", "ema": {"student": (method.student, 0.75)}, "out_dir": str(tmp_path)}
    trainer = _trainer(method, max_steps=4, checkpoint_every=2, **kwargs)
    assert trainer.ema["student"].folded
    trainer.train()
    opt = trainer.optimizers["student"]
    for (name, _), copy in zip(method.student.named_parameters(), opt.ema_parameters()):
        assert trainer.ema_state_dict("student")[name] is copy
    resumed_method = _method()
    resumed = _trainer(resumed_method, max_steps=4, **{**kwargs, "ema": {"student": (resumed_method.student, 0.75)}})
    resumed.resume(str(tmp_path / "checkpoint-2")).train()
    for key, value in trainer.ema_state_dict("student").items():
        assert torch.equal(value, resumed.ema_state_dict("student")[key]), key
    for (name, a), b in zip(method.state_dict().items(), resumed_method.state_dict().values()):
        assert torch.equal(a, b), name


def test_log_lines_hold_losses_lr_grad_norm_and_throughput(tmp_path):
    method = _method()
    trainer = _trainer(method, max_steps=5, log_every=2, out_dir=str(tmp_path), clip_grad_norm=1e9)
    trainer.train()
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in lines] == [2, 4, 5]
    for record in lines:
        student = record["phases"]["student"]
        assert student["lr"] == 3e-3 and student["loss"] > 0 and student["grad_norm"] > 0
        assert abs(student["loss"] - student["mse"]) < 0.1 * student["loss"]
        assert record["seconds"] > 0 and record["samples_per_s"] > 0
    assert "critic" in lines[-1]["phases"]          # step 4 (index) trains the critic too
    # unclipped norms are computed at log steps: the same value the clip reports
    norm = torch.nn.utils.get_total_norm([p.grad for p in method.student.parameters()])
    assert abs(lines[-1]["phases"]["student"]["grad_norm"] - float(norm)) < 1e-5 * float(norm)


def test_plain_progress_lines_without_tqdm(monkeypatch, capsys):
    from fewstep.train import logging as train_logging
    monkeypatch.setattr(train_logging.importlib.util, "find_spec", lambda name: None)
    _trainer(_method(), max_steps=4, log_every=2, progress=True).train()
    err = capsys.readouterr().err
    assert "step 2/4" in err and "step 4/4" in err and "student/loss" in err


def test_checkpoints_are_complete_and_latest_points_at_the_newest(tmp_path):
    trainer = _trainer(_method(), max_steps=5, checkpoint_every=2, out_dir=str(tmp_path))
    trainer.train()
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-5", "latest", "log.jsonl"]
    assert open(tmp_path / "latest").read().strip() == "checkpoint-5"
    assert sorted(os.listdir(tmp_path / "checkpoint-5")) == ["ema.safetensors", "model.safetensors",
                                                             "optimizers.pt", "rng.pt", "trainer.json"]
    trainer.save_checkpoint()  # rewriting a step replaces it whole and leaves no temporary
    assert sorted(os.listdir(tmp_path)) == names


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_resume_from_an_iterable_skips_what_was_consumed(tmp_path, mixed_precision):
    gen = torch.Generator().manual_seed(5)
    batches = [make_data(4)(i, gen) for i in range(3)]   # 3 batches: epochs wrap during 5 steps x 2
    kwargs = {"grad_accum": 2, "mixed_precision": mixed_precision}
    whole = _method()
    whole_trainer = _trainer(whole, batches, max_steps=5, **kwargs).train()
    _trainer(_method(), batches, max_steps=3, checkpoint_every=3, out_dir=str(tmp_path), **kwargs).train()
    resumed = _method()
    trainer = _trainer(resumed, batches, max_steps=5, out_dir=str(tmp_path), **kwargs).resume()
    assert trainer.step == 3 and trainer.batches_drawn == 6
    trainer.train()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for phase, scaler in whole_trainer.scalers.items():
        assert scaler.state_dict() == trainer.scalers[phase].state_dict()


def test_nan_loss_stops_with_the_step_before_a_checkpoint(tmp_path):
    class NaNAtStep3(TinyDistill):
        def loss(self, phase, batch, step):
            loss, logs = super().loss(phase, batch, step)
            return (loss * float("nan") if step == 3 and phase == "student" else loss), logs

    torch.manual_seed(0)
    trainer = _trainer(NaNAtStep3(), max_steps=8, log_every=100, checkpoint_every=5, out_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"'student'.*not finite.*step 3"):
        trainer.train()
    assert not os.path.exists(tmp_path / "checkpoint-5")


class _ScalarLessMethod(TinyDistill):
    def loss(self, phase, batch, step):
        return batch["x0"] * 0 + self.student[0].bias.sum(), {}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mixed_precision": "fp8"}, ValueError, "mixed_precision: expected one of"),
    ({"grad_accum": 0}, ValueError, "grad_accum: expected an int >= 1, got 0"),
    ({"max_steps": 2.5}, ValueError, "max_steps: expected an int"),
    ({"lr": {"student": 1e-3}}, ValueError, r"lr: expected a float or a learning rate for each phase"),
    ({"lr": -1.0}, ValueError, "lr: expected a non-negative number"),
    ({"checkpoint_every": 2}, ValueError, "out_dir: expected a directory"),
    ({"clip_grad_norm": 0}, ValueError, "clip_grad_norm: expected None or a positive number"),
    ({"parallel": "ddp"}, RuntimeError, "needs a process group: launch with torchrun"),
    ({"parallel": "tp"}, ValueError, "parallel: expected one of"),
    ({"optimizers": "sgd"}, TypeError, "optimizers: expected None, 'fused_adamw' or a factory"),
    ({"optimizers": lambda phase, params, lr: None}, TypeError, "expected the factory to return"),
    ({"frozen": ("teachr",)}, ValueError, "frozen: expected names of the method's submodules"),
    ({"frozen": ("student",)}, ValueError, "frozen: .* phase 'student' trains parameters that only they hold"),
    ({"ema": {"s": (nn.Linear(2, 2), 0.9)}}, ValueError, r"ema\['s'\]: expected a module whose trainable"),
    ({"ema": {"s": (None, 1.5)}}, ValueError, r"ema\['s'\]: expected a decay in \[0, 1\]"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    method = _method()
    if "ema" in kwargs and kwargs["ema"]["s"][0] is None:
        kwargs = {"ema": {"s": (method.student, 1.5)}}
    with pytest.raises(error, match=match):
        _trainer(method, **kwargs)


def test_bad_method_data_and_losses_are_reported():
    with pytest.raises(TypeError, match="method: expected a fewstep.distill.DistillationMethod, got Linear"):
        Trainer(nn.Linear(2, 2), make_data(2), max_steps=1)
    with pytest.raises(TypeError, match="data: expected an iterable of batches or a callable"):
        _trainer(_method(), data=3)
    with pytest.raises(TypeError, match="data: expected each batch to be a dict .* got list at batch 0"):
        _trainer(_method(), data=[[torch.randn(2, DIM)]]).train()
    with pytest.raises(RuntimeError, match="data: the iterator ended after 2 batches"):
        _trainer(_method(), data=iter([make_data(2)(i, torch.Generator()) for i in range(2)])).train()
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"method.loss\('student', ...\) at step 0: expected a scalar tensor"):
        _trainer(_ScalarLessMethod()).train()


def test_resume_needs_a_checkpoint(tmp_path):
    trainer = _trainer(_method(), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="path: expected a checkpoint pointer at .*latest"):
        trainer.resume()
    with pytest.raises(FileNotFoundError, match="path: expected a checkpoint directory"):
        trainer.resume(str(tmp_path))
    other = _trainer(_method(with_target=False), out_dir=str(tmp_path / "o"), max_steps=1, checkpoint_every=1)
    other.train()
    with pytest.raises(KeyError, match=r"does not fit this method: missing \['target"):
        trainer.resume(str(tmp_path / "o" / "checkpoint-1"))


def test_ema_copies_are_fp32_for_bf16_weights_and_fp64_for_fp64_weights():
    from fewstep.train.ema import EMA
    for dtype, ema_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                             (torch.float64, torch.float64)):
        module = nn.Linear(3, 4).to(dtype)
        ema = EMA("m", module, 0.5)
        start = module.weight.detach().to(ema_dtype, copy=True)
        with torch.no_grad():
            module.weight.add_(1.0)
        ema.update()
        state = ema.state_dict()
        assert {t.dtype for t in state.values()} == {ema_dtype}
        torch.testing.assert_close(state["weight"], 0.5 * start + 0.5 * module.weight.to(ema_dtype))
