"""CPU timings (pytest-benchmark) of fewstep.local_window_attention's C++ kernel against what a CPU
user would otherwise run: dense SDPA with CLEAR's boolean mask. Shape: a 32x32 token grid plus 77
text tokens, 8 heads, head dim 64, fp32. Run: ``make bench-cpu``."""
import pytest
import torch

import fewstep
from fewstep.reference.local_window_attention import local_window_mask

GRID, N_TEXT, HEADS, HEAD_DIM = (32, 32), 77, 8, 64
N = N_TEXT + GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, HEADS, N, HEAD_DIM, generator=gen) for _ in range(4)]  # q, k, v, grad_out


def fewstep_attention(q, k, v, radius):
    with fewstep.backend("cpu"):
        return fewstep.local_window_attention(q, k, v, grid=GRID, radius=radius, n_text=N_TEXT)


def masked_sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def forward_backward(attention, q, k, v, grad_out, *args):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, *args)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("radius", [8.0, 16.0])
@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("kernel", ["fewstep-cpu", "sdpa-masked"])
def test_local_window_attention(benchmark, inputs, radius, direction, kernel):
    benchmark.group = f"local-window attention 32x32+77 text, 8 heads, D=64, r={radius:g}, fp32, {direction}"
    q, k, v, grad_out = inputs
    if kernel == "fewstep-cpu":
        attention, extra = fewstep_attention, (radius,)
    else:
        attention, extra = masked_sdpa, (local_window_mask(GRID, N_TEXT, radius=radius),)
    if direction == "forward":
        out = benchmark.pedantic(attention, (q, k, v, *extra), rounds=5, warmup_rounds=1)
    else:
        out, _ = benchmark.pedantic(forward_backward, (attention, q, k, v, grad_out, *extra), rounds=5,
                                    warmup_rounds=1)
    expected = masked_sdpa(q, k, v, local_window_mask(GRID, N_TEXT, radius=radius))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
