"""fewstep.attention.LocalWindowAttention and PooledKV against the dense masked reference."""
import subprocess
import sys

import pytest
import torch

from fewstep.attention import LocalWindowAttention, PooledKV
from fewstep.reference.local_window_attention import local_window_attention_reference


def _qkv(b, heads, kv_heads, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n, d, generator=g, dtype=dtype)
    k = torch.randn(b, kv_heads, n, d, generator=g, dtype=dtype)
    v = torch.randn(b, kv_heads, n, d, generator=g, dtype=dtype)
    return q, k, v


def _pool_by_loops(x, grid, weight):
    """Weighted f x f pooling of [B, h, H*W, D] image tokens, block by block."""
    h, w = grid
    f = weight.shape[0]
    img = x.unflatten(2, (h, w))
    out = torch.zeros(x.shape[0], x.shape[1], h // f, w // f, x.shape[3], dtype=x.dtype)
    for by in range(h // f):
        for bx in range(w // f):
            for i in range(f):
                for j in range(f):
                    out[:, :, by, bx] += weight[i, j] * img[:, :, by * f + i, bx * f + j]
    return out.flatten(2, 3)


@pytest.mark.parametrize("pattern", [dict(radius=2.5), dict(window=(1, 2))])
@pytest.mark.parametrize("b,heads,kv_heads,grid,n_text", [(1, 2, 2, (5, 7), 3), (2, 4, 2, (3, 4), 0)])
def test_module_matches_reference(pattern, b, heads, kv_heads, grid, n_text):
    n = n_text + grid[0] * grid[1]
    q, k, v = _qkv(b, heads, kv_heads, n, 6)
    module = LocalWindowAttention(grid=grid, n_text=n_text, **pattern)
    out = module(q, k, v)
    ref, _ = local_window_attention_reference(q, k, v, grid=grid, n_text=n_text, **pattern)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_grid_and_text_given_per_call_override_the_module():
    q, k, v = _qkv(1, 2, 2, 2 + 4 * 5, 8)
    module = LocalWindowAttention(radius=2, grid=(9, 9), n_text=7)
    out = module(q, k, v, grid=(4, 5), n_text=2)
    ref, _ = local_window_attention_reference(q, k, v, grid=(4, 5), n_text=2, radius=2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_forward_flat_on_projection_layout():
    b, n_text, grid, heads, kv_heads, d = 1, 3, (3, 5), 4, 2, 5
    n = n_text + 15
    g = torch.Generator().manual_seed(1)
    # [B, N, heads*D] slices of one fused projection: non-contiguous inputs
    fused = torch.randn(b, n, (heads + 2 * kv_heads) * d, generator=g, dtype=torch.float64)
    q, k, v = fused.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    module = LocalWindowAttention(radius=1.5, grid=grid, n_text=n_text)
    out = module.forward_flat(q, k, v, heads=heads, kv_heads=kv_heads)
    split = lambda t, h: t.reshape(b, n, h, d).transpose(1, 2)  # noqa: E731
    ref, _ = local_window_attention_reference(split(q, heads), split(k, kv_heads), split(v, kv_heads), grid=grid,
                                              n_text=n_text, radius=1.5)
    assert out.shape == (b, n, heads * d)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, n, heads * d), rtol=1e-12, atol=1e-12)


def test_pooled_kv_is_the_weighted_block_sum():
    grid, f = (4, 6), 2
    x = torch.randn(2, 3, 24, 5, dtype=torch.float64)
    pool = PooledKV(f, dtype=torch.float64)
    torch.testing.assert_close(pool(x, grid), _pool_by_loops(x, grid, torch.full((f, f), 0.25, dtype=torch.float64)))
    with torch.no_grad():
        pool.spatial_weight.copy_(torch.randn(f, f, dtype=torch.float64))
    torch.testing.assert_close(pool(x, grid), _pool_by_loops(x, grid, pool.spatial_weight.detach()))


def test_module_with_pooled_kv_appends_pooled_image_tokens():
    grid, n_text, f = (4, 6), 3, 2
    q, k, v = _qkv(1, 2, 2, n_text + 24, 4)
    module = LocalWindowAttention(radius=2, grid=grid, n_text=n_text, pooled_kv_factor=f, dtype=torch.float64)
    with torch.no_grad():
        module.pooled_kv.spatial_weight.copy_(torch.rand(f, f, dtype=torch.float64))
    weight = module.pooled_kv.spatial_weight.detach()
    extra_k = _pool_by_loops(k[:, :, n_text:], grid, weight)
    extra_v = _pool_by_loops(v[:, :, n_text:], grid, weight)
    ref, _ = local_window_attention_reference(q, k, v, grid=grid, n_text=n_text, radius=2, extra_k=extra_k,
                                              extra_v=extra_v)
    torch.testing.assert_close(module(q, k, v), ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_module_and_pooled_weights():
    grid, n_text = (2, 4), 1
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, n_text + 8, 3))
    module = LocalWindowAttention(radius=1.5, grid=grid, n_text=n_text, pooled_kv_factor=2, dtype=torch.float64)
    weight = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)

    def run(q, k, v, weight):
        return torch.func.functional_call(module, {"pooled_kv.spatial_weight": weight}, (q, k, v))

    assert torch.autograd.gradcheck(run, (q, k, v, weight))


@pytest.mark.parametrize("pooled_kv_factor", [None, 2])
def test_compiles_fullgraph(pooled_kv_factor):
    grid, n_text = (4, 6), 2
    q, k, v = _qkv(1, 2, 2, n_text + 24, 8, dtype=torch.float32)
    module = LocalWindowAttention(window=(1, 1), grid=grid, n_text=n_text, pooled_kv_factor=pooled_kv_factor)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), module(q, k, v))


@pytest.mark.parametrize("kwargs,match", [
    (dict(radius=2, window=(1, 1)), "radius: expected exactly one of radius and window"),
    (dict(), "radius: expected exactly one of radius and window"),
    (dict(radius=0.5), r"radius: expected a number >= 1, got 0.5"),
    (dict(window=(1, -1)), r"window: expected \(ry, rx\), two ints >= 0, got \(1, -1\)"),
    (dict(radius=2, grid=(3,)), r"grid: expected \(H, W\), two ints >= 1, got \(3,\)"),
    (dict(radius=2, n_text=-1), "n_text: expected an int >= 0, got -1"),
    (dict(radius=2, pooled_kv_factor=0), "pooled_kv_factor: expected an int >= 1, got 0"),
])
def test_bad_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalWindowAttention(**kwargs)


def test_bad_call_is_named():
    q, k, v = _qkv(1, 2, 2, 2 + 15, 4)
    with pytest.raises(ValueError, match=r"grid: expected \(H, W\) at construction or call, got None"):
        LocalWindowAttention(radius=2, n_text=2)(q, k, v)
    with pytest.raises(ValueError, match=r"grid: expected H and W divisible by the pooling factor 2, got \(3, 5\)"):
        LocalWindowAttention(radius=2, grid=(3, 5), n_text=2, pooled_kv_factor=2, dtype=torch.float64)(q, k, v)
    with pytest.raises(ValueError, match=r"q: expected \[B, N, 3\*D\], got \[1, 17, 8\]"):
        LocalWindowAttention(radius=2, grid=(3, 5), n_text=2).forward_flat(
            q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2), heads=3)
    with pytest.raises(ValueError, match="q: expected N"):  # the op's own check: 2 + 3*4 != 17
        LocalWindowAttention(radius=2, grid=(3, 4), n_text=2)(q, k, v)


def test_fewstep_and_clear_import_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"  # makes `import diffusers` fail
            "import fewstep, fewstep.clear, fewstep.attention\n"
            "assert 'diffusers' not in sys.modules or sys.modules['diffusers'] is None\n"
            "print(fewstep.attention.LocalWindowAttention(radius=2).radius)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
