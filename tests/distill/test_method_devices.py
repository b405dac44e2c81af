"""A method made of models on some device keeps its step tables on that device (no per-step copy)."""
import pytest
import torch
from torch import nn

import fewstep
from fewstep.distill import BOOT, LCD, GuidedDistillation
from fewstep.distill.common import device_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, t, **cond):
        return self.lin(x)


def test_device_of_reads_the_first_module_with_a_tensor():
    assert device_of(None, nn.ReLU(), Net().to("meta")) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")


@pytest.mark.parametrize("make", [
    lambda teacher, student: LCD(teacher, student, w_min=0.0, w_max=0.0),
    lambda teacher, student: GuidedDistillation(teacher, student, w_min=1.0, w_max=1.0, num_steps=4),
    lambda teacher, student: BOOT(teacher, student, num_intervals=4),
], ids=["lcd", "guided", "boot"])
def test_step_tables_live_where_the_models_do(make):
    teacher = fewstep.Denoiser(Net().to("meta"), "eps", fewstep.VPSchedule())
    method = make(teacher, Net().to("meta"))
    buffers = dict(method.named_buffers())
    assert buffers and all(b.device.type == "meta" for b in buffers.values()), \
        {name: b.device for name, b in buffers.items()}
