"""Wall time of fewstep's CPU kernels at one thread and at torch's thread count (median of 7 runs
after a warm-up), to see that at::parallel_for spreads them over the threads (build_info()["openmp"]),
beside the PyTorch op a CPU user would otherwise call where there is one.
Run: ``python bench/cpu_threads.py OUT.json`` with the extension installed."""
import json
import sys

import torch
from common import cpu_median_ms

import fewstep


def cases() -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(1024, 1024, generator=gen) for _ in range(16)]
    ema = [p.clone() for p in params]
    model = [torch.nn.Parameter(p.clone()) for p in params]
    for p in model:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = fewstep.optim.FusedAdamW(model, lr=1e-3)
    torch_model = [torch.nn.Parameter(p.detach().clone()) for p in model]
    for p, q in zip(torch_model, model):
        p.grad = q.grad.clone()
    torch_opt = torch.optim.AdamW(torch_model, lr=1e-3, fused=True)
    torch_ema = [p.clone() for p in params]
    x, x0_real, x0_fake = (torch.randn(16, 4, 64, 64, generator=gen) for _ in range(3))
    grid, n_text, heads, head_dim = (32, 32), 77, 8, 64
    q, k, v = (torch.randn(1, heads, n_text + grid[0] * grid[1], head_dim, generator=gen).requires_grad_()
               for _ in range(3))

    def dmd_forward_backward():
        leaf = x.clone().requires_grad_(True)
        fewstep.losses.dmd(leaf, x0_real, x0_fake).backward()

    def attention(backward: bool):
        out = fewstep.local_window_attention(q, k, v, grid=grid, radius=16.0, n_text=n_text)
        if backward:
            torch.autograd.grad(out.sum(), [q, k, v])

    return {
        "ema_update_, 16 x 1M fp32": lambda: fewstep.ema_update_(ema, params, 0.999),
        "torch._foreach_lerp_ (the EMA's baseline)": lambda: torch._foreach_lerp_(torch_ema, params, 0.001),
        "FusedAdamW.step, 16 x 1M fp32": opt.step,
        "torch.optim.AdamW(fused=True).step (baseline)": torch_opt.step,
        "losses.dmd fwd+bwd, 16x4x64x64": dmd_forward_backward,
        "local_window_attention fwd, 32x32+77, 8x64, r=16": lambda: attention(False),
        "local_window_attention fwd+bwd, 32x32+77, 8x64, r=16": lambda: attention(True),
    }


def main() -> None:
    threads = torch.get_num_threads()
    results = {"build_info": fewstep.build_info(), "threads": threads, "ms": {}}
    with fewstep.backend("cpu"):
        for name, fn in cases().items():
            for n in sorted({1, threads}):
                torch.set_num_threads(n)
                key = f"{name} @ {n} thread" + ("s" if n > 1 else "")
                results["ms"][key] = cpu_median_ms(fn)
                print(f"{key}: {results['ms'][key]:.2f} ms", flush=True)
    torch.set_num_threads(threads)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
