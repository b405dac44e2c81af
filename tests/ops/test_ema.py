"""fewstep.ema_update_: the multi-tensor EMA update against a float64 reference."""
from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_close_to_reference, devices

import fewstep

SHAPES = [(1,), (7, 33), (3, 5, 71), (2049,), (4, 1, 3, 3)]


def pairs(device, ema_dtype, param_dtype, gen, shapes=SHAPES):
    ema = [torch.randn(s, generator=gen).to(device, ema_dtype) for s in shapes]
    params = [torch.randn(s, generator=gen).to(device, param_dtype) for s in shapes]
    return ema, params


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ema_dtype,param_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float64, torch.float64)])
def test_matches_float64_reference(device, ema_dtype, param_dtype):
    gen = torch.Generator().manual_seed(0)
    ema, params = pairs(device, ema_dtype, param_dtype, gen)
    before = [e.clone() for e in ema]
    decay = 0.9993
    fewstep.ema_update_(ema, params, decay)
    for e, e0, p in zip(ema, before, params):
        exact = torch.lerp(e0.double(), p.double(), 1 - decay)
        compute = torch.float64 if ema_dtype == torch.float64 else torch.float32
        in_torch = torch.lerp(e0.to(compute), p.to(compute), 1 - decay).to(ema_dtype)
        assert_close_to_reference(e, exact, in_torch, f"ema {tuple(e.shape)}")


@pytest.mark.parametrize("device", devices())
def test_many_tensors_non_default_decays_and_empty_ones(device):
    gen = torch.Generator().manual_seed(1)
    shapes = [(int(n),) for n in torch.randint(0, 70, (900,), generator=gen)]  # > 768 per launch, some empty
    ema, params = pairs(device, torch.float32, torch.float32, gen, shapes)
    expected = [e.clone() for e in ema]
    torch._foreach_lerp_(expected, params, 0.25)
    fewstep.ema_update_(ema, params, 0.75)
    for e, x in zip(ema, expected):
        torch.testing.assert_close(e, x, rtol=1e-6, atol=1e-6)
    fewstep.ema_update_(ema, params, 0.0)  # decay 0 copies the parameters
    assert all(torch.equal(e, p) for e, p in zip(ema, params))
    frozen = [e.clone() for e in ema]
    fewstep.ema_update_(ema, [p + 1 for p in params], 1.0)  # decay 1 keeps the average
    assert all(torch.equal(e, f) for e, f in zip(ema, frozen))


def test_accepts_module_parameters_and_the_reference_backend_agrees():
    torch.manual_seed(0)
    model, ema_model = torch.nn.Linear(9, 5), torch.nn.Linear(9, 5)
    ref = [p.detach().clone() for p in ema_model.parameters()]
    fewstep.ema_update_(ema_model.parameters(), model.parameters(), 0.99)
    with fewstep.backend("reference"):
        fewstep.ema_update_(ref, list(model.parameters()), 0.99)
    for a, b in zip(ema_model.parameters(), ref):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("device", devices())
def test_opcheck_and_compile(device):
    gen = torch.Generator().manual_seed(2)
    ema, params = pairs(device, torch.float32, torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.fewstep.ema_update_.default, ([e.clone() for e in ema], params, 0.9))
    eager = [e.clone() for e in ema]
    fewstep.ema_update_(eager, params, 0.9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda es, ps: torch.ops.fewstep.ema_update_(es, ps, 0.9), fullgraph=True,
                             backend="aot_eager")
    compiled(ema, params)
    assert all(torch.equal(a, b) for a, b in zip(ema, eager))


@pytest.mark.parametrize("make,error,message", [
    (lambda e, p: (e, p[:-1], 0.9), ValueError, "params: expected 5 tensors (one per ema tensor), got 4"),
    (lambda e, p: (e, p, 1.5), ValueError, "decay: expected a number in [0, 1], got 1.5"),
    (lambda e, p: (e, p, float("nan")), ValueError, "decay: expected a number in [0, 1], got nan"),
    (lambda e, p: (e, [p[0], p[2], *p[2:]], 0.9), ValueError,
     "params[1]: expected shape [7, 33] (the shape of ema[1]), got [3, 5, 71]"),
    (lambda e, p: ([e[0], e[1].t(), *e[2:]], [p[0], p[1].t(), *p[2:]], 0.9), ValueError,
     "ema[1], params[1]: expected contiguous tensors"),
    (lambda e, p: ([e[0].long(), *e[1:]], p, 0.9), TypeError, "ema[0]: expected dtype in"),
    (lambda e, p: ([e[0].double(), *e[1:]], p, 0.9), TypeError,
     "params[0]: expected torch.float64 with a torch.float64 ema (and not otherwise), got torch.float32"),
])
def test_bad_input(make, error, message):
    gen = torch.Generator().manual_seed(3)
    ema, params = pairs("cpu", torch.float32, torch.float32, gen)
    with pytest.raises(error, match=re.escape(message)):
        torch.ops.fewstep.ema_update_(*make(ema, params))
    with pytest.raises(TypeError, match="decay: expected a float in \\[0, 1\\], got str"):
        fewstep.ema_update_(ema, params, "0.9")


def test_fsdp2_shards_update_in_place(tmp_path):
    """DTensors (FSDP2's sharded parameters) update through their local shards, in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(5)
        whole_ema = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen)]
        whole_params = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen)]
        ema = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in whole_ema]
        params = [distribute_tensor(t, mesh, [Shard(0)]) for t in whole_params]
        fewstep.ema_update_(ema, params, 0.75)
        for got, e, p in zip(ema, whole_ema, whole_params):
            torch.testing.assert_close(got.full_tensor(), 0.75 * e + 0.25 * p, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()
