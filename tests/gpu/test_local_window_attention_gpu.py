"""fewstep.local_window_attention on the GPU (the Gluon kernels on Hopper, the Triton kernels at
their GPU tile sizes, both compared on the same inputs): forward, lse and gradients in bf16/fp16/fp32 against the float64 reference, error at most 2x that of the same
dense masked computation done by PyTorch at the input dtype; no recompilation across grids, text
lengths and radii; deterministic backward; the torch.library contract on CUDA tensors."""
from __future__ import annotations

import math
import zlib
from dataclasses import replace

import pytest
import torch
from helpers import HAS_CUDA, HAS_TRITON, assert_close_to_reference, poison_allocator
from local_window_cases import Case

import fewstep
from fewstep.triton import local_window_attention as triton_lwa
from fewstep.reference.local_window_attention import local_window_attention_reference

pytestmark = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="no CUDA device (or no triton): GPU test skipped")


CASES = {  # odd grids (the GPU tiles are 8x8 queries and keys, 4x8 queries and 8x8 keys in dK/dV)
    "13x17 text extra gqa r4.5": Case(1, 6, 2, 64, (13, 17), 7, n_extra=5, radius=4.5, noncontiguous=True),
    "13x17 window batch 2": Case(2, 2, 2, 64, (13, 17), 7, window=(2, 3)),
    "40x33 text r16 (inside tiles)": Case(1, 3, 1, 128, (40, 33), 77, radius=16.0),
    "21x45 image only r=sqrt(8)": Case(1, 2, 1, 64, (21, 45), 0, n_extra=3, radius=math.sqrt(8)),
    "19x23 image only, no extra tokens": Case(1, 4, 2, 64, (19, 23), 0, radius=6.0),  # text code compiled out
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def make_inputs(case: Case, dtype: torch.dtype, seed: int, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)

    def rand(heads: int, n: int) -> torch.Tensor:
        t = torch.randn(case.batch, heads, n, case.head_dim, generator=gen, dtype=torch.float64)
        if case.noncontiguous:  # [B, N, heads, D] storage
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.to("cuda", dtype).requires_grad_(requires_grad)

    extra = ((rand(case.kv_heads, case.n_extra), rand(case.kv_heads, case.n_extra)) if case.n_extra
             else (None, None))
    return (rand(case.heads, case.seq_len), rand(case.kv_heads, case.seq_len), rand(case.kv_heads, case.seq_len),
            *extra)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_lse_and_gradients_match_reference(name, dtype, head_dim):
    case = replace(CASES[name], head_dim=head_dim)
    inputs = make_inputs(case, dtype, seed=zlib.crc32(name.encode()) + head_dim, requires_grad=True)
    leaves = [t for t in inputs if t is not None]
    q, k, v, ek, ev = inputs
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    poison_allocator(q)
    out, lse = fewstep.local_window_attention(q, k, v, **kwargs, return_lse=True)  # auto: triton on CUDA
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    grad_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    ref_out, ref_lse = local_window_attention_reference(q, k, v, **kwargs)
    same_out, same_lse = local_window_attention_reference(q, k, v, **kwargs, dtype=dtype)
    tag = f"[{name},{dtype},D={head_dim}]"
    assert_close_to_reference(out, ref_out, same_out, "out" + tag)
    assert_close_to_reference(lse, ref_lse, same_lse, "lse" + tag)
    ref = torch.autograd.grad(ref_out, leaves, grad_out)
    same = torch.autograd.grad(same_out, leaves, grad_out.to(dtype))
    for what, g, r, s in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref, same):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_to_reference(g, r, s, what + tag)


# The Gluon forward's edge cases on top of CASES: a single key block (fewer blocks than its
# pipeline's stages), and text and extra tokens spanning several 64-row blocks with a partial last one.
GLUON_CASES = {**CASES, "3x5 one key block": Case(1, 2, 1, 64, (3, 5), 0, radius=2.0),
               "9x70 long text and extras, window": Case(2, 4, 2, 64, (9, 70), 200, n_extra=70, window=(3, 9))}


@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GLUON_CASES))
def test_gluon_kernels_match_reference(name, dtype, head_dim):
    """The Gluon sm_90 kernels (forward, dK/dV, dQ) against the float64 reference, next to the Triton
    kernels on the same inputs: out, lse and the five gradients."""
    case = replace(GLUON_CASES[name], head_dim=head_dim)
    inputs = make_inputs(case, dtype, seed=zlib.crc32(name.encode()) + head_dim, requires_grad=True)
    q, k, v, ek, ev = inputs
    if not triton_lwa.gluon_supported(q):
        pytest.skip(f"the Gluon kernels need an sm_90 GPU, this is {torch.cuda.get_device_name()}")
    leaves = [t for t in inputs if t is not None]
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    ref_out, ref_lse = local_window_attention_reference(q, k, v, **kwargs)
    same_out, same_lse = local_window_attention_reference(q, k, v, **kwargs, dtype=dtype)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out)
    same_grads = torch.autograd.grad(same_out, leaves, grad_out.to(dtype))
    tag = f"[{name},{dtype},D={head_dim}]"
    with torch.no_grad():
        for gluon in (True, False):
            poison_allocator(q)
            out, lse = triton_lwa.launch_forward(gluon, q, k, v, ek, ev, *case.pattern())
            assert_close_to_reference(out, ref_out, same_out, f"out{tag} gluon={gluon}")
            assert_close_to_reference(lse, ref_lse, same_lse, f"lse{tag} gluon={gluon}")
            poison_allocator(q)
            grads = triton_lwa.launch_backward(gluon, grad_out.to(dtype), q, k, v, ek, ev, out, lse, *case.pattern())
            for what, g, r, same in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref_grads, same_grads):
                assert_close_to_reference(g, r, same, f"{what}{tag} gluon={gluon}")


@pytest.mark.parametrize("gluon", [True, False])
def test_gradients_stay_finite_when_every_score_of_a_row_is_very_negative(gluon):
    """Queries along u, keys along -u: every score is below -170, so lse is too, and exp(-lse)
    overflows fp32. Keys past the grid, the text and the extra tokens load as zero rows of K: they
    must not put inf * 0 = NaN into the gradients (bf16, D=128, the GPU kernels of both families)."""
    case = Case(1, 2, 1, 128, (13, 11), 70, n_extra=5, radius=4.5)
    q, k, v, ek, ev = make_inputs(case, torch.bfloat16, seed=41)
    if gluon and not triton_lwa.gluon_supported(q):
        pytest.skip(f"the Gluon kernels need an sm_90 GPU, this is {torch.cuda.get_device_name()}")
    u = torch.nn.functional.normalize(torch.randn(case.head_dim, generator=torch.Generator().manual_seed(42)), dim=0)
    u = u.to("cuda")
    q = (q * 0.1 + 45 * u).to(q.dtype).requires_grad_()
    k, ek = ((t * 0.1 - 45 * u).to(t.dtype).requires_grad_() for t in (k, ek))
    v, ev = v.requires_grad_(), ev.requires_grad_()
    leaves = [q, k, v, ek, ev]
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    ref_out, _ = local_window_attention_reference(q, k, v, **kwargs)
    same_out, _ = local_window_attention_reference(q, k, v, **kwargs, dtype=torch.bfloat16)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out)
    same_grads = torch.autograd.grad(same_out, leaves, grad_out.to(torch.bfloat16))
    with torch.no_grad():
        out, lse = triton_lwa.launch_forward(gluon, q, k, v, ek, ev, *case.pattern())
        assert lse.max() < -100
        poison_allocator(q)
        grads = triton_lwa.launch_backward(gluon, grad_out.to(q.dtype), q, k, v, ek, ev, out, lse, *case.pattern())
    for what, g, r, same in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref_grads, same_grads):
        assert g.isfinite().all(), what
        assert_close_to_reference(g, r, same, f"{what}[gluon={gluon}, scores below -170]")


def test_gluon_direct_launch_matches_triton_jit_launch(monkeypatch):
    """After the first launch of a specialisation, the Gluon kernels and the delta kernel launch
    without Triton's JIT (fewstep.triton.direct_launch): same outputs and gradients, bit for bit, as
    launches through the JIT with validated descriptors, on a new grid, text length and radius too."""
    from fewstep.triton import _local_window_attention_gluon as gluon_kernels
    from fewstep.triton import _local_window_attention_kernels as triton_kernels
    from fewstep.triton import direct_launch

    def run(case):
        inputs = make_inputs(case, torch.bfloat16, seed=11)
        q, k, v, ek, ev = inputs
        poison_allocator(q)
        out, lse = triton_lwa.launch_forward(True, q, k, v, ek, ev, *case.pattern())
        gen = torch.Generator("cuda").manual_seed(5)
        grad_out = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen)
        poison_allocator(q)
        return (out, lse, *triton_lwa.launch_backward(True, grad_out, q, k, v, ek, ev, out, lse, *case.pattern()))

    first = CASES["13x17 text extra gqa r4.5"]
    if not triton_lwa.gluon_supported(make_inputs(first, torch.bfloat16, seed=0)[0]):
        pytest.skip(f"the Gluon kernels need an sm_90 GPU, this is {torch.cuda.get_device_name()}")
    run(first)  # compiles (through the JIT) and caches the specialisations
    assert direct_launch.cached_kernels() >= 4
    other = replace(first, grid=(11, 26), n_text=70, radius=7.5)
    for case in (first, other):
        with monkeypatch.context() as patch:
            for kernel in (gluon_kernels.forward_kernel_sm90, gluon_kernels.kv_grad_kernel_sm90,
                           gluon_kernels.q_grad_kernel_sm90, triton_kernels.delta_kernel):
                def refuse(*args, name=kernel.__name__, **kwargs):
                    raise AssertionError(f"{name} launched through the JIT")
                patch.setattr(kernel, "run", refuse)
            direct = run(case)
        with monkeypatch.context() as patch:
            patch.setattr(triton_lwa, "direct_launch", direct_launch.launch_through_jit)
            through_jit = run(case)
        for what, a, b in zip(["out", "lse", "dq", "dk", "dv", "dextra_k", "dextra_v"], direct, through_jit):
            assert torch.equal(a, b), f"{what}: direct launch differs from the JIT launch on {case}"


def test_gluon_kernels_run_on_hopper_only():
    q = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert triton_lwa.gluon_supported(q) == hopper
    assert not triton_lwa.gluon_supported(q.float())
    assert not triton_lwa.gluon_supported(torch.randn(1, 2, 64, 256, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("head_dim", [32, 40, 72, 80, 96, 256])  # 72: DiT, PixArt; 40, 80, 96: between powers of two
def test_other_head_dims(head_dim):
    case = replace(CASES["13x17 text extra gqa r4.5"], head_dim=head_dim)
    inputs = make_inputs(case, torch.bfloat16, seed=4, requires_grad=True)
    q, k, v, ek, ev = inputs
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    out = fewstep.local_window_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, list(inputs), torch.ones_like(out))
    ref_out, _ = local_window_attention_reference(q, k, v, **kwargs)
    same_out, _ = local_window_attention_reference(q, k, v, **kwargs, dtype=torch.bfloat16)
    assert_close_to_reference(out, ref_out, same_out, f"out[D={head_dim}]")
    ref = torch.autograd.grad(ref_out, list(inputs), torch.ones_like(ref_out))
    same = torch.autograd.grad(same_out, list(inputs), torch.ones_like(same_out))
    for what, g, r, s in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref, same):
        assert_close_to_reference(g, r, s, f"{what}[D={head_dim}]")


def test_training_shape_matches_reference():
    """CLEAR's training shape (64x64 image tokens + 512 text, r=16), fewer heads to bound the reference."""
    case = Case(1, 4, 4, 128, (64, 64), 512, radius=16.0)
    inputs = make_inputs(case, torch.bfloat16, seed=6, requires_grad=True)
    q, k, v, _, _ = inputs
    out = fewstep.local_window_attention(q, k, v, **case.kwargs())
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], grad_out)
    ref_out, _ = local_window_attention_reference(q, k, v, **case.kwargs())
    same_out, _ = local_window_attention_reference(q, k, v, **case.kwargs(), dtype=torch.bfloat16)
    assert_close_to_reference(out, ref_out, same_out, "out[64x64+512]")
    ref = torch.autograd.grad(ref_out, [q, k, v], grad_out.double())
    same = torch.autograd.grad(same_out, [q, k, v], grad_out)
    for what, g, r, s in zip(["dq", "dk", "dv"], grads, ref, same):
        assert_close_to_reference(g, r, s, what + "[64x64+512]")


def test_no_recompilation_for_new_grid_text_length_or_radius():
    from fewstep.triton.local_window_attention import compiled_kernel_count

    def step(grid, n_text, radius, n_extra):
        case = Case(1, 4, 2, 128, grid, n_text, n_extra=n_extra, radius=radius)
        q, k, v, ek, ev = make_inputs(case, torch.bfloat16, seed=7, requires_grad=True)
        out = fewstep.local_window_attention(q, k, v, **case.kwargs(), extra_k=ek, extra_v=ev)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()

    step((13, 17), 7, 4.5, 3)
    compiled = compiled_kernel_count()
    assert compiled >= 4  # forward, delta, dK/dV, dQ
    for grid, n_text, radius, n_extra in [((64, 64), 512, 16.0, 5), ((31, 96), 1, 8.0, 16), ((1, 129), 300, 2.0, 1),
                                          ((128, 64), 16, 32.5, 32)]:
        step(grid, n_text, radius, n_extra)
    assert compiled_kernel_count() == compiled, "a new grid, text length, extra count or radius recompiled a kernel"


def test_backward_is_deterministic():
    case = CASES["40x33 text r16 (inside tiles)"]
    q, k, v, _, _ = make_inputs(case, torch.bfloat16, seed=8)
    pattern = (*case.grid, case.n_text, case.radius, -1, -1, 0.1)
    out, lse = torch.ops.fewstep.local_window_attention_triton(q, k, v, None, None, *pattern)
    grad_out = torch.randn_like(q)
    runs = [torch.ops.fewstep.local_window_attention_triton_backward(grad_out, q, k, v, None, None, out, lse, *pattern)
            for _ in range(3)]
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))


def test_opcheck_and_compile_on_cuda():
    case = CASES["13x17 text extra gqa r4.5"]
    q, k, v, ek, ev = make_inputs(case, torch.float16, seed=9, requires_grad=True)
    args = (q, k, v, ek, ev, *case.grid, case.n_text, case.radius, -1, -1, 0.125)
    torch.library.opcheck(torch.ops.fewstep.local_window_attention_triton.default, args)
    with torch.no_grad():
        out, lse = torch.ops.fewstep.local_window_attention_triton(*args)
    detached = [t.detach() for t in (q, k, v, ek, ev)]
    torch.library.opcheck(torch.ops.fewstep.local_window_attention_triton_backward.default,
                          (torch.randn_like(out), *detached, out, lse, *args[5:]))

    def loss(q, k, v, ek, ev):
        return fewstep.local_window_attention(q, k, v, **case.kwargs(), extra_k=ek, extra_v=ev).float().square().sum()

    torch._dynamo.reset()
    eager = torch.autograd.grad(loss(q, k, v, ek, ev), [q, k, v, ek, ev])
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v, ek, ev), [q, k, v, ek, ev])
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)  # the same kernels run


def test_gpu_errors_name_the_argument():
    q = torch.randn(1, 2, 7 + 6 * 5, 36, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^q: expected a head dim \(dim 3\) of at most 256 whose rows are a multiple "
                                         r"of 16 bytes on the triton backend \(TMA\), got 36 \(72 bytes in torch.bfloat16\)$"):
        fewstep.local_window_attention(q, q, q, grid=(6, 5), n_text=7, radius=2.0)
    with fewstep.backend("cuda"), pytest.raises(fewstep.BackendUnavailableError, match="local_window_attention: backend 'cuda' is unavailable"):
        fewstep.local_window_attention(q, q, q, grid=(6, 5), n_text=7, radius=2.0)
    q = torch.randn(1, 2, 37, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 37, 48, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^k: expected shape \[1, kv_heads, 37, 64\]"):
        fewstep.local_window_attention(q, k, k, grid=(6, 5), n_text=7, radius=2.0)
