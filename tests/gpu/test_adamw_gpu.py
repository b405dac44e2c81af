"""FusedAdamW on the GPU: the CUDA kernel against the CPU kernel, against torch.optim.AdamW(fused=True)
followed by fewstep.ema_update_, and an optimizer step without host-device syncs."""
from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA

import fewstep
from fewstep.optim import FusedAdamW

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")

# > 512 tensors (two launches), sizes around the kernel's block of 8192 elements and 1-element tensors.
SHAPES = [(1,), (8191,), (8192,), (8193,), (70001,), (5, 4099), (3, 5, 71), (1 << 20,)] + \
    [(int(n),) for n in torch.randint(1, 300, (600,), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_kernel_matches_cpu_kernel(dtype):
    gen = torch.Generator().manual_seed(1)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    exp_avgs = [torch.randn(s, generator=gen).to(state_dtype) for s in SHAPES]
    exp_avg_sqs = [torch.rand(s, generator=gen).to(state_dtype) for s in SHAPES]
    emas = [torch.randn(s, generator=gen).to(state_dtype) for s in SHAPES]
    cpu = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, emas)]
    gpu = [[t.cuda() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, emas)]
    kwargs = dict(step=7, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, ema_decay=0.9)
    fewstep.ops.adamw_step_(cpu[0], grads, cpu[1], cpu[2], cpu[3], **kwargs)
    fewstep.ops.adamw_step_(gpu[0], [g.cuda() for g in grads], gpu[1], gpu[2], gpu[3], **kwargs)
    # CUDA contracts a*b+c into FMAs: the two kernels may differ in the last place of the
    # compute type, which can flip one rounding of a 16-bit parameter (one unit in its last place),
    # which moves its EMA by (1 - ema_decay) of that unit.
    compute_eps, param_eps = torch.finfo(state_dtype).eps, torch.finfo(dtype).eps
    largest = max(float(p.abs().max()) for p in params)
    tolerances = {"params": (param_eps, 8 * compute_eps), "exp_avgs": (8 * compute_eps, 8 * compute_eps),
                  "exp_avg_sqs": (8 * compute_eps, 8 * compute_eps),
                  "ema": (8 * compute_eps, 8 * compute_eps + (1 - kwargs["ema_decay"]) * param_eps * largest)}
    for (what, (rtol, atol)), c, g in zip(tolerances.items(), cpu, gpu):
        torch.testing.assert_close(torch.cat([t.cpu().reshape(-1) for t in g]), torch.cat([t.reshape(-1) for t in c]),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{what} ({dtype}): {m}")
    assert not torch.equal(gpu[0][0].cpu(), params[0])


def test_error_within_twice_torch_fused_adamw_then_ema_update():
    """Against float64 AdamW + EMA: fewstep's fp32 error is at most twice that of torch's fused fp32
    AdamW followed by ema_update_ (both round differently: FMAs, lerp's two branches)."""
    gen = torch.Generator().manual_seed(2)
    ref = [torch.randn(s, generator=gen, dtype=torch.float64).cuda().requires_grad_() for s in SHAPES]
    ours = [p.detach().float().requires_grad_() for p in ref]
    theirs = [p.detach().float().requires_grad_() for p in ref]
    groups = lambda ps: [dict(params=ps[:300], lr=1e-3, weight_decay=0.1),  # noqa: E731
                         dict(params=ps[300:], lr=3e-3, weight_decay=0.0, betas=(0.8, 0.95))]
    opt = FusedAdamW(groups(ours), ema_decay=0.99)
    torch_opt = torch.optim.AdamW(groups(theirs), fused=True)
    ref_opt = torch.optim.AdamW(groups(ref), foreach=False)
    emas = [p.detach().clone() for p in theirs]
    ref_emas = [p.detach().clone() for p in ref]
    for step in range(5):
        gen = torch.Generator().manual_seed(100 + step)
        for a, b, r in zip(ours, theirs, ref):
            r.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64).cuda()
            a.grad, b.grad = r.grad.float(), r.grad.float()
        opt.step()
        torch_opt.step()
        ref_opt.step()
        fewstep.ema_update_(emas, theirs, 0.99)
        fewstep.ema_update_(ref_emas, ref, 0.99)
    flat = lambda ts: torch.cat([t.detach().double().reshape(-1) for t in ts])  # noqa: E731
    quantities = {"params": (ours, theirs, ref), "ema": (opt.ema_parameters(), emas, ref_emas)}
    for key in ("exp_avg", "exp_avg_sq"):
        quantities[key] = tuple([o.state[p][key] for p in ps] for o, ps in
                                ((opt, ours), (torch_opt, theirs), (ref_opt, ref)))
    for what, (mine, torchs, exact) in quantities.items():
        exact = flat(exact)
        err_ours = (flat(mine) - exact).abs().max().item()
        err_torch = (flat(torchs) - exact).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-12, (what, err_ours, err_torch)


def test_step_makes_no_host_device_sync():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).cuda()
    opt = FusedAdamW(model.parameters(), lr=1e-3, ema_decay=0.999)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):  # the first step allocates the moments
        model(x).square().mean().backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(e).all() for e in opt.ema_parameters())
