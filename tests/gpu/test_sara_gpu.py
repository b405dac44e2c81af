"""SaRA on the GPU: CUDA kernels against the CPU kernels, and a training step without host syncs."""
from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA

from fewstep.finetune import SaRA
from fewstep.finetune.selection import TensorSelection
from fewstep.ops.sara import sara_adamw_step_, sara_gather_
from fewstep.reference.sara import FORMAT_BITMASK, FORMAT_INDICES, LAYOUT_COLS

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")


def _selection(n, density, fmt, gen):
    mask = torch.rand(n, generator=gen) < density
    sel = TensorSelection.from_mask(mask)
    if sel.format != fmt:  # force the format under test
        from fewstep.reference.sara import pack_bitmask
        if fmt == FORMAT_BITMASK:
            words, offsets = pack_bitmask(mask)
            sel = TensorSelection(fmt, n, sel.k, words, offsets)
        else:
            sel = TensorSelection(fmt, n, sel.k, mask.nonzero().squeeze(1).int(), torch.empty(0, dtype=torch.int32))
    return sel


@pytest.mark.parametrize("fmt", [FORMAT_INDICES, FORMAT_BITMASK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_cpu_kernels(fmt, dtype):
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 31, 1025, 70001, 1 << 20]
    sels = [_selection(n, 0.17, fmt, gen) for n in sizes]
    weights = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    rows, cb, mb, sb, chb = [], 0, 0, 0, 0
    for w, s in zip(weights, sels):
        low = dtype != torch.float32
        rows.append([s.format, s.numel, s.k, cb, mb if low else -1, sb, chb])
        cb, mb = cb + s.k, mb + (s.k if low else 0)
        sb, chb = sb + s.data.numel(), chb + s.chunk_offsets.numel()
    layout = torch.tensor(rows, dtype=torch.int64).reshape(-1, LAYOUT_COLS)
    selection = torch.cat([s.data for s in sels])
    chunks = torch.cat([s.chunk_offsets for s in sels])
    master = torch.cat([w[s.indices()].float() for w, s in zip(weights, sels)]) if dtype != torch.float32 \
        else torch.empty(0)
    k = cb
    state = {"grad": torch.zeros(k), "m": torch.zeros(k), "v": torch.zeros(k), "master": master}
    cpu = {"w": [w.clone() for w in weights], **{n: t.clone() for n, t in state.items()}}
    gpu = {"w": [w.cuda() for w in weights], **{n: t.cuda() for n, t in state.items()}}
    dense_grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    for step in (1, 2):
        for side, dev in ((cpu, "cpu"), (gpu, "cuda")):
            side["grad"].zero_()
            for r, s, g in zip(rows, sels, dense_grads):
                sara_gather_(g.to(dev), side["grad"][r[3]: r[3] + s.k], s.data.to(dev), s.chunk_offsets.to(dev),
                             s.format, 1.5)
            sara_adamw_step_(side["w"], side["m"], side["v"], side["master"], side["grad"], layout,
                             selection.to(dev), chunks.to(dev), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.1, step=step)
    torch.testing.assert_close(gpu["grad"].cpu(), cpu["grad"], rtol=0, atol=0)
    # CUDA contracts multiply-adds into FMAs: a few fp32 ulps
    torch.testing.assert_close(gpu["m"].cpu(), cpu["m"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gpu["v"].cpu(), cpu["v"], rtol=1e-6, atol=1e-9)
    for a, b, w0, s in zip(gpu["w"], cpu["w"], weights, sels):
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(a.cpu(), b, **tol)
        assert (a.cpu() != w0).sum() >= 0.9 * s.k


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_has_no_host_sync_and_matches_cpu(dtype):
    gpu_model, cpu_model = _model().cuda().to(dtype), _model().to(dtype)
    opt_g = SaRA(gpu_model, ratio=0.2, lr=1e-3)
    opt_c = SaRA(cpu_model, ratio=0.2, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 96, generator=gen)) for _ in range(3)]

    def train(model, opt, device):
        for x, y in data:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = (model(x.to(device, dtype)).float() - y.to(device)).square().mean()
            loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()

    data = [(x.cuda(), y.cuda()) for x, y in data]  # moved before the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train(gpu_model, opt_g, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    data = [(x.cpu(), y.cpu()) for x, y in data]
    train(cpu_model, opt_c, "cpu")
    for a, b in zip(gpu_model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-2, atol=5e-3)  # bf16 autocast on two devices


def test_polar_factor_matches_svd_on_gpu():
    from fewstep.finetune.sara import polar_factor
    torch.manual_seed(0)
    a = torch.randn(640, 2880, device="cuda") * (torch.rand(640, 2880, device="cuda") < 0.06)
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    torch.testing.assert_close(polar_factor(a).double(), u @ vh, rtol=0, atol=1e-4)


def test_rank_penalty_step_is_sync_free():
    model = _model().cuda()
    opt = SaRA(model, ratio=0.2, lr=1e-3, lambda_rank=5e-4, rank_min_dim=32)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
