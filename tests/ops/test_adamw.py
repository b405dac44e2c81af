"""fewstep.optim.FusedAdamW and the fused multi-tensor op fewstep::adamw_step_ against
torch.optim.AdamW, the reference and fewstep.ema_update_."""
from __future__ import annotations

import io
import re

import pytest
import torch
from helpers import assert_close_to_reference, devices

import fewstep
from fewstep.optim import FusedAdamW

# More tensors than one launch's table (512), odd sizes, and tensors that cross the CPU kernel's
# block of 2^14 elements and the CUDA kernel's of 8192.
MANY_SHAPES = [(1,), (7, 33), (3, 5, 71), (2049,), (4, 1, 3, 3), (16385,), (5, 4099)] + \
    [(int(n),) for n in torch.randint(1, 40, (520,), generator=torch.Generator().manual_seed(0))]
GROUPS = [dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05),
          dict(lr=3e-3, betas=(0.3, 0.95), weight_decay=0.0, eps=1e-6)]  # beta1 < 0.5: lerp's other branch


def make_params(shapes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


def set_grads(params, step, skip=()):
    gen = torch.Generator().manual_seed(1000 + step)
    for k, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        p.grad = None if k in skip else g.to(p.device, p.dtype)


def groups_of(params):
    half = len(params) // 2
    return [dict(params=params[:half], **GROUPS[0]), dict(params=params[half:], **GROUPS[1])]


def run_steps(make_optimizer, params, steps, skip_at=None):
    opt = make_optimizer(groups_of(params))
    for step in range(steps):
        set_grads(params, step, skip=(3, 400) if step == skip_at else ())
        opt.step()
    return opt


def flat(tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def states(opt, params, key):
    return [opt.state[p][key] for p in params]


@pytest.mark.parametrize("device", devices())
def test_float64_matches_torch_adamw(device):
    """Same arithmetic in the same order: float64 results agree to a few units in the last place of
    the inputs' magnitude (torch's vectorized lerp uses an FMA, so moments near zero differ by that
    much), with two param groups, per-parameter step counts (two parameters miss a step) and > 512
    tensors."""
    ours = make_params(MANY_SHAPES, torch.float64, device, 0)
    theirs = make_params(MANY_SHAPES, torch.float64, device, 0)
    opt = run_steps(FusedAdamW, ours, 4, skip_at=1)
    ref = run_steps(lambda g: torch.optim.AdamW(g, foreach=False), theirs, 4, skip_at=1)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(flat(states(opt, ours, key)), flat(states(ref, theirs, key)), rtol=1e-14,
                                   atol=1e-15)
    torch.testing.assert_close(flat(ours), flat(theirs), rtol=1e-14, atol=1e-15)
    assert opt.state[ours[3]]["step"] == 3 and opt.state[ours[4]]["step"] == 4


@pytest.mark.parametrize("device", devices())
def test_float32_error_within_twice_torch_adamw(device):
    """float32 parameters: error against float64 AdamW at most 2x torch.optim.AdamW's in float32."""
    ours = make_params(MANY_SHAPES, torch.float32, device, 1)
    torch32 = make_params(MANY_SHAPES, torch.float32, device, 1)
    exact = [p.detach().double().requires_grad_() for p in ours]
    opt = run_steps(FusedAdamW, ours, 4, skip_at=2)
    in_torch = run_steps(lambda g: torch.optim.AdamW(g, foreach=False), torch32, 4, skip_at=2)
    ref = run_steps(lambda g: torch.optim.AdamW(g, foreach=False), exact, 4, skip_at=2)
    assert_close_to_reference(flat(ours).float(), flat(exact), flat(torch32), "params")
    for key in ("exp_avg", "exp_avg_sq"):
        assert_close_to_reference(flat(states(opt, ours, key)).float(), flat(states(ref, exact, key)),
                                  flat(states(in_torch, torch32, key)), key)


@pytest.mark.parametrize("device", devices())
def test_ema_matches_ema_update_after_the_step(device):
    shapes = MANY_SHAPES[:40]
    fused, plain = make_params(shapes, torch.float32, device, 2), make_params(shapes, torch.float32, device, 2)
    opt = FusedAdamW(groups_of(fused), ema_decay=0.9)
    opt_plain = FusedAdamW(groups_of(plain))
    emas = [p.detach().clone() for p in plain]
    for step in range(3):
        set_grads(fused, step, skip=(5,) if step == 1 else ())
        set_grads(plain, step, skip=(5,) if step == 1 else ())
        opt.step()
        opt_plain.step()
        fewstep.ema_update_(emas, plain, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert all(torch.equal(a, b) for a, b in zip(opt.ema_parameters(), emas))
    assert not torch.equal(emas[0], plain[0].detach())  # the EMA lags the parameters


@pytest.mark.parametrize("device", devices())
def test_mixed_dtypes_in_one_launch_match_the_reference(device):
    """fp32, bf16 and fp16 parameters in one group: updated in fp32 (fp32 moments and EMA) and
    rounded once, as the reference does."""
    shapes = [(7, 33), (3, 5, 71), (2049,), (1,), (16385,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float16]
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(device, d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=gen).to(device, d) for s, d in zip(shapes, dtypes)]
    moments = [(torch.randn(s, generator=gen).to(device), torch.rand(s, generator=gen).to(device)) for s in shapes]
    emas = [torch.randn(s, generator=gen).to(device) for s in shapes]

    def state():
        return ([p.clone() for p in params], [m.clone() for m, _ in moments], [v.clone() for _, v in moments],
                [e.clone() for e in emas])

    kwargs = dict(step=5, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, ema_decay=0.95)
    kernel, ref = state(), state()
    fewstep.ops.adamw_step_(kernel[0], grads, *kernel[1:], **kwargs)
    with fewstep.backend("reference"):
        fewstep.ops.adamw_step_(ref[0], grads, *ref[1:], **kwargs)
    for k, dtype in enumerate(dtypes):
        eps = torch.finfo(dtype).eps
        for what, a, b in zip(("param", "exp_avg", "exp_avg_sq", "ema"), kernel, ref):
            assert a[k].dtype == (dtype if what == "param" else torch.float32)
            # one rounding of a float32 result that may differ in its last place
            torch.testing.assert_close(a[k], b[k], rtol=eps if what == "param" else 1e-6, atol=1e-7,
                                       msg=f"{what}[{k}] ({dtype})")
        assert not torch.equal(kernel[0][k], params[k])


def test_float64_reference_backend_agrees_with_the_kernel():
    shapes = MANY_SHAPES[:30]
    gen = torch.Generator().manual_seed(4)
    lists = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(5)]
    lists[3] = [v.abs() for v in lists[3]]
    kernel = [[t.clone() for t in ts] for ts in lists]
    kwargs = dict(step=2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, ema_decay=0.99)
    fewstep.ops.adamw_step_(kernel[0], lists[1], kernel[2], kernel[3], kernel[4], **kwargs)
    with fewstep.backend("reference"):
        fewstep.ops.adamw_step_(lists[0], lists[1], lists[2], lists[3], lists[4], **kwargs)
    for a, b in zip(kernel, lists):  # torch's lerp_ (the reference) uses an FMA: see above
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-14, atol=1e-15)


def _checkpointed_run(dtype_of_group1):
    def params():
        gen = torch.Generator().manual_seed(5)
        return [torch.randn(s, generator=gen).to(torch.float32 if k < 3 else dtype_of_group1).requires_grad_()
                for k, s in enumerate([(7, 33), (3, 5, 71), (1,), (2049,), (4, 1, 3, 3)])]

    def optimizer(ps):
        return FusedAdamW([dict(params=ps[:3], **GROUPS[0]), dict(params=ps[3:], **GROUPS[1])], ema_decay=0.99)

    straight = params()
    opt = optimizer(straight)
    for step in range(6):
        set_grads(straight, step)
        opt.step()
        if step == 2:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in straight], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = params()
    with torch.no_grad():
        for p, s in zip(resumed, saved["params"]):
            p.copy_(s)
    opt_resumed = optimizer(resumed)
    opt_resumed.load_state_dict(saved["opt"])
    for step in range(3, 6):
        set_grads(resumed, step)
        opt_resumed.step()
    return straight, opt, resumed, opt_resumed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_exact(dtype):
    straight, opt, resumed, opt_resumed = _checkpointed_run(dtype)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
        sa, sb = opt.state[a], opt_resumed.state[b]
        assert sa.keys() == sb.keys() == {"step", "exp_avg", "exp_avg_sq", "ema"}
        assert sa["step"] == sb["step"] == 6
        for key in ("exp_avg", "exp_avg_sq", "ema"):
            assert sb[key].dtype == torch.float32  # not cast to a bf16 parameter's dtype on load
            assert torch.equal(sa[key], sb[key])
    assert opt_resumed.param_groups[1]["betas"] == GROUPS[1]["betas"]


def test_loads_torch_adamw_state():
    gen = torch.Generator().manual_seed(6)
    p_torch = torch.randn(9, 5, generator=gen).requires_grad_()
    p_ours = p_torch.detach().clone().requires_grad_()
    torch_opt, ours = torch.optim.AdamW([p_torch], lr=1e-2, foreach=False), FusedAdamW([p_ours], lr=1e-2)
    for step in range(2):
        set_grads([p_torch], step)
        torch_opt.step()
    with torch.no_grad():
        p_ours.copy_(p_torch)
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.state[p_ours]["step"] == 2
    set_grads([p_torch], 2)
    set_grads([p_ours], 2)
    torch_opt.step()
    ours.step()
    torch.testing.assert_close(p_ours, p_torch, rtol=1e-6, atol=1e-7)


def test_zero_grad_swap_ema_and_copy_ema_to():
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.GELU(), torch.nn.Linear(17, 3))
    ema_model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.GELU(), torch.nn.Linear(17, 3))
    opt = FusedAdamW(model.parameters(), lr=1e-2, ema_decay=0.5)
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(7))
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    trained = [p.detach().clone() for p in model.parameters()]
    emas = [e.clone() for e in opt.ema_parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(trained, emas))
    opt.copy_ema_to(ema_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_model.parameters(), emas))
    opt.swap_ema()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), emas))
    with pytest.raises(RuntimeError, match=re.escape("step: the parameters hold their EMA (swap_ema() was called)")):
        opt.step()
    opt.swap_ema()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trained))
    assert all(torch.equal(a, b) for a, b in zip(opt.ema_parameters(), emas))


def test_non_contiguous_gradient_is_accepted():
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(7, 33, generator=gen).requires_grad_()
    q = p.detach().clone().requires_grad_()
    g = torch.randn(33, 7, generator=gen)
    p.grad, q.grad = g.t(), g.t().contiguous()
    FusedAdamW([p], lr=1e-2).step()
    FusedAdamW([q], lr=1e-2).step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("with_ema", [False, True])
def test_opcheck_and_compile(with_ema):
    shapes = [(7, 33), (3, 5, 71), (1,)]

    def args():
        g = torch.Generator().manual_seed(9)
        return ([torch.randn(s, generator=g).bfloat16() for s in shapes],
                [torch.randn(s, generator=g).bfloat16() for s in shapes],
                [torch.randn(s, generator=g) for s in shapes], [torch.rand(s, generator=g) for s in shapes],
                [torch.randn(s, generator=g) for s in shapes] if with_ema else [])

    scalars = (3, 1e-2, 0.9, 0.999, 1e-8, 0.01, 0.9)
    torch.library.opcheck(torch.ops.fewstep.adamw_step_.default, (*args(), *scalars))
    eager, compiled_args = args(), args()
    torch.ops.fewstep.adamw_step_(*eager, *scalars)
    torch._dynamo.reset()
    step, lr, beta1, beta2, eps, weight_decay, ema_decay = scalars
    compiled = torch.compile(lambda *a: fewstep.ops.adamw_step_(*a, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                                weight_decay=weight_decay, ema_decay=ema_decay),
                             fullgraph=True, backend="aot_eager")
    compiled(*compiled_args)
    for a, b in zip(eager, compiled_args):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _op_args():
    gen = torch.Generator().manual_seed(11)
    shapes = [(7, 33), (3, 5, 71), (2049,)]
    lists = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    return lists, dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, ema_decay=0.9)


def _replace(lists, which, index, tensor):
    lists = [list(ts) for ts in lists]
    lists[which][index] = tensor
    return lists


@pytest.mark.parametrize("make,error,message", [
    (lambda l, k: ([l[0], l[1][:2], *l[2:]], k), ValueError, "grads: expected 3 tensors (one per parameter), got 2"),
    (lambda l, k: ([*l[:4], l[4][:1]], k), ValueError,
     "ema_params: expected 3 tensors (one per parameter) or none, got 1"),
    (lambda l, k: (_replace(l, 1, 1, l[1][1][:2]), k), ValueError,
     "grads[1]: expected shape [3, 5, 71] (the shape of params[1]), got [2, 5, 71]"),
    (lambda l, k: (_replace(l, 1, 2, l[1][2].bfloat16()), k), TypeError,
     "grads[2]: expected dtype torch.float32 for a torch.float32 parameter, got torch.bfloat16"),
    (lambda l, k: (_replace(_replace(l, 0, 0, l[0][0].bfloat16()), 1, 0, l[1][0].bfloat16()), k), None, None),
    (lambda l, k: (_replace(l, 2, 0, l[2][0].bfloat16()), k), TypeError,
     "exp_avgs[0]: expected dtype torch.float32 for a torch.float32 parameter, got torch.bfloat16"),
    (lambda l, k: (_replace(l, 4, 0, l[4][0].double()), k), TypeError,
     "ema_params[0]: expected dtype torch.float32 for a torch.float32 parameter, got torch.float64"),
    (lambda l, k: (_replace(l, 3, 0, l[3][0].t().contiguous().t()), k), ValueError,
     "exp_avg_sqs[0]: expected a contiguous tensor, got strides [1, 7] for shape [7, 33]"),
    (lambda l, k: (_replace(l, 0, 1, l[0][1].long()), k), TypeError, "params[1]: expected dtype in"),
    (lambda l, k: (l, {**k, "step": 0}), ValueError, "step: expected the 1-based count of this update, got 0"),
    (lambda l, k: (l, {**k, "beta1": 1.0}), ValueError, "beta1: expected a number in [0, 1), got 1"),
    (lambda l, k: (l, {**k, "beta2": float("nan")}), ValueError, "beta2: expected a number in [0, 1), got nan"),
    (lambda l, k: (l, {**k, "lr": -1.0}), ValueError, "lr: expected a finite number >= 0, got -1"),
    (lambda l, k: (l, {**k, "eps": 0.0}), ValueError, "eps: expected a finite number > 0, got 0"),
    (lambda l, k: (l, {**k, "weight_decay": float("inf")}), ValueError,
     "weight_decay: expected a finite number >= 0, got inf"),
    (lambda l, k: (l, {**k, "ema_decay": 1.5}), ValueError, "ema_decay: expected a number in [0, 1], got 1.5"),
])
def test_op_bad_input(make, error, message):
    lists, kwargs = _op_args()
    lists, kwargs = make(lists, kwargs)
    if error is None:  # a bf16 parameter with a bf16 gradient and fp32 state is valid
        fewstep.ops.adamw_step_(*lists, **kwargs)
        return
    with pytest.raises(error, match=re.escape(message)):
        fewstep.ops.adamw_step_(*lists, **kwargs)


def test_optimizer_bad_input():
    p = torch.randn(7, 33, requires_grad=True)
    cases = [
        (lambda: FusedAdamW([p], lr=-1.0), ValueError,
         "param_groups[0]['lr']: expected a number in [0, inf), got -1.0"),
        (lambda: FusedAdamW([p], betas=(0.9, 1.0)), ValueError,
         "param_groups[0]['betas'][1]: expected a number in [0, 1), got 1.0"),
        (lambda: FusedAdamW([p], betas=0.9), TypeError, "param_groups[0]['betas']: expected a pair of floats, got 0.9"),
        (lambda: FusedAdamW([p], eps=0.0), ValueError,
         "param_groups[0]['eps']: expected a number in (0, inf), got 0.0"),
        (lambda: FusedAdamW([p], weight_decay="0.1"), TypeError,
         "param_groups[0]['weight_decay']: expected a float, got str"),
        (lambda: FusedAdamW([p], ema_decay=1.01), ValueError,
         "param_groups[0]['ema_decay']: expected a number in [0, 1], got 1.01"),
        (lambda: FusedAdamW([{"params": [p]}, {"params": [torch.randn(3, 4).t().requires_grad_()]}]), ValueError,
         "param_groups[1]['params'][0]: expected a contiguous parameter, got strides (1, 4) for shape [4, 3]"),
        (lambda: FusedAdamW([p]).ema_parameters(), ValueError,
         "ema_parameters: this optimizer keeps no EMA (construct it with ema_decay=...)"),
        (lambda: FusedAdamW([p], ema_decay=0.9).copy_ema_to([p, p]), ValueError,
         "module_params: expected 1 tensors (one per EMA tensor), got 2"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            make()
    q = torch.randn(4, 6, requires_grad=True)
    opt = FusedAdamW([{"params": [q]}, {"params": [p]}])
    q.grad, p.grad = torch.randn(4, 6), torch.randn(7, 33).to_sparse()
    q_before = q.detach().clone()
    with pytest.raises(TypeError, match=re.escape("param_groups[1]['params'][0].grad: expected a dense gradient, "
                                                  "got layout torch.sparse_coo")):
        opt.step()
    assert torch.equal(q, q_before) and "step" not in opt.state[q]  # nothing was updated
    with pytest.raises(TypeError, match=re.escape("param_groups[0]['params'][0]: expected dtype in")):
        FusedAdamW([torch.zeros(3, dtype=torch.int64)])
