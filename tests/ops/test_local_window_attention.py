"""fewstep.local_window_attention on every CPU-reachable backend (C++ ``cpu``, ``triton`` under
TRITON_INTERPRET=1 in fp32/fp16, ``reference``) against the float64 dense masked reference:
forward, lse and gradients, the torch.library contract of the Triton ops, torch.compile, and bad
input. The C++ ops' own tests are in test_local_window_attention_cpu.py; bf16 Triton and the GPU
tile sizes are tested in tests/gpu/test_local_window_attention_gpu.py."""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import replace

import pytest
import torch
from helpers import HAS_TRITON, assert_close_to_reference, poison_allocator
from local_window_cases import Case

import fewstep
from fewstep.reference.local_window_attention import local_window_attention_reference

TRITON_HERE = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


# Odd grids that are no multiple of a tile (the interpreter's tiles are 4x8 queries, 2x8 keys).
CASES = {
    "circle text gqa noncontig": Case(1, 4, 2, 16, (5, 11), 3, radius=2.5, noncontiguous=True),
    "circle text extra gqa strict": Case(1, 3, 1, 16, (6, 9), 5, n_extra=2, radius=3.0),  # d^2 = 9 excluded
    "window extra batch 2": Case(2, 2, 2, 32, (4, 9), 0, n_extra=3, window=(1, 2)),
    "circle covers the grid": Case(1, 2, 1, 16, (3, 13), 2, radius=40.0),
    "window of one row": Case(1, 1, 1, 16, (5, 3), 0, window=(0, 1)),
    "window wider than tiles": Case(1, 2, 1, 16, (9, 23), 1, window=(6, 20)),  # tiles entirely inside
    "one grid row, non-integer r^2": Case(1, 2, 2, 16, (1, 19), 4, n_extra=1, radius=math.sqrt(5)),
}
# The fp16 Triton runs (slow under the interpreter) take a subset that still has every feature.
HALF_CASES = ["circle text gqa noncontig", "circle text extra gqa strict", "window extra batch 2"]


def backend_dtypes() -> list[tuple[str, torch.dtype, str]]:
    runs = [("reference", dt, c) for dt in (torch.float64, torch.float32) for c in CASES]
    runs += [("cpu", dt, c) for dt in (torch.float64, torch.float32, torch.bfloat16) for c in CASES]
    if TRITON_HERE:  # Triton's interpreter gets bf16 wrong; bf16 Triton runs on the GPU only
        runs += [("triton", torch.float32, c) for c in CASES]
        runs += [("triton", torch.float16, c) for c in HALF_CASES]
    return runs


RUNS = backend_dtypes()


def make_inputs(case: Case, dtype: torch.dtype, seed: int, *, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)

    def rand(heads: int, n: int) -> torch.Tensor:
        t = torch.randn(case.batch, heads, n, case.head_dim, generator=gen, dtype=torch.float64)
        if case.noncontiguous:  # [B, N, heads, D] storage, as projections produce it
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.to(dtype).requires_grad_(requires_grad)

    q = rand(case.heads, case.seq_len)
    k, v = rand(case.kv_heads, case.seq_len), rand(case.kv_heads, case.seq_len)
    extra = (rand(case.kv_heads, case.n_extra), rand(case.kv_heads, case.n_extra)) if case.n_extra else (None, None)
    return q, k, v, *extra


def run_op(backend: str, case: Case, q, k, v, extra_k, extra_v):
    poison_allocator(q)
    with fewstep.backend(backend):
        return fewstep.local_window_attention(q, k, v, **case.kwargs(), extra_k=extra_k, extra_v=extra_v,
                                              return_lse=True)


@pytest.mark.parametrize("backend,dtype,name", RUNS)
def test_forward_and_lse_match_reference(backend, dtype, name):
    case = CASES[name]
    inputs = make_inputs(case, dtype, seed=zlib.crc32(name.encode()))
    out, lse = run_op(backend, case, *inputs)
    assert out.shape == inputs[0].shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == inputs[0].shape[:3] and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    q, k, v, ek, ev = inputs
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    ref_out, ref_lse = local_window_attention_reference(q, k, v, **kwargs)
    same_out, same_lse = local_window_attention_reference(q, k, v, **kwargs, dtype=dtype)
    assert_close_to_reference(out, ref_out, same_out, f"out[{backend},{dtype},{name}]")
    assert_close_to_reference(lse, ref_lse, same_lse, f"lse[{backend},{dtype},{name}]")


@pytest.mark.parametrize("backend,dtype,name", [r for r in RUNS if r[0] != "reference"])
def test_gradients_match_reference(backend, dtype, name):
    case = CASES[name]
    inputs = make_inputs(case, dtype, seed=zlib.crc32(name.encode()) + 1, requires_grad=True)
    leaves = [t for t in inputs if t is not None]
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, lse = run_op(backend, case, *inputs)
    assert not lse.requires_grad  # lse is returned for inspection; gradients flow through out
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    q, k, v, ek, ev = inputs
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    ref = torch.autograd.grad(local_window_attention_reference(q, k, v, **kwargs)[0], leaves, grad_out)
    same = torch.autograd.grad(local_window_attention_reference(q, k, v, **kwargs, dtype=dtype)[0], leaves,
                               grad_out.to(dtype))
    for what, g, r, s in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref, same):
        assert g.shape == r.shape and g.dtype == dtype
        assert_close_to_reference(g, r, s, f"{what}[{backend},{dtype},{name}]")


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if TRITON_HERE else []))
def test_gradients_stay_finite_when_every_score_of_a_row_is_very_negative(backend):
    """Queries along u, keys along -u: every score is about -225, so lse is too, and exp(-lse)
    overflows. Keys outside the grid (zeros in a border tile) must not enter the gradients then."""
    case = CASES["circle text gqa noncontig"]
    q, k, v, _, _ = make_inputs(case, torch.float32, seed=31)
    direction = torch.nn.functional.normalize(torch.randn(case.head_dim, generator=torch.Generator().manual_seed(32)),
                                              dim=0)
    q = (q.detach() * 0.1 + 30 * direction).requires_grad_()
    k = (k.detach() * 0.1 - 30 * direction).requires_grad_()
    v = v.detach().requires_grad_()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    out, lse = run_op(backend, case, q, k, v, None, None)
    assert lse.max() < -150
    grads = torch.autograd.grad(out, (q, k, v), grad_out.float())
    ref = torch.autograd.grad(local_window_attention_reference(q, k, v, **case.kwargs())[0], (q, k, v), grad_out)
    same = torch.autograd.grad(local_window_attention_reference(q, k, v, **case.kwargs(), dtype=torch.float32)[0],
                               (q, k, v), grad_out.float())
    for what, g, r, s in zip(["dq", "dk", "dv"], grads, ref, same):
        assert_close_to_reference(g, r, s, f"{what}[{backend}, scores near -225]")


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
def test_triton_takes_contiguous_inputs_that_start_unaligned():
    """TMA descriptors need 16-byte aligned bases: a contiguous view one element into its storage
    (``x[1:]``) is copied rather than rejected."""
    case = Case(1, 2, 1, 16, (5, 6), 3, n_extra=2, radius=2.5)
    inputs = make_inputs(case, torch.float32, seed=21)

    def unaligned(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view.requires_grad_()

    shifted = [unaligned(t) for t in inputs]
    out, _ = run_op("triton", case, *shifted)
    grads = torch.autograd.grad(out, shifted, torch.ones_like(out))
    q, k, v, ek, ev = [t.detach().requires_grad_() for t in inputs]
    ref = fewstep.local_window_attention(q, k, v, **case.kwargs(), extra_k=ek, extra_v=ev)
    ref_grads = torch.autograd.grad(ref, [q, k, v, ek, ev], torch.ones_like(ref))
    with fewstep.backend("triton"):
        aligned = fewstep.local_window_attention(q, k, v, **case.kwargs(), extra_k=ek, extra_v=ev)
    torch.testing.assert_close(out, aligned, rtol=0, atol=0)  # the same kernels on the same values
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
def test_triton_backward_is_deterministic_and_without_extra_has_empty_extra_grads():
    case = replace(CASES["circle text gqa noncontig"], grid=(3, 6), n_text=2)
    q, k, v, _, _ = make_inputs(case, torch.float32, seed=3)
    pattern = (*case.grid, case.n_text, case.radius, -1, -1, 0.25)
    out, lse = torch.ops.fewstep.local_window_attention_triton(q, k, v, None, None, *pattern)
    grad_out = torch.randn_like(q)
    first = torch.ops.fewstep.local_window_attention_triton_backward(grad_out, q, k, v, None, None, out, lse, *pattern)
    second = torch.ops.fewstep.local_window_attention_triton_backward(grad_out, q, k, v, None, None, out, lse, *pattern)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[3].shape == (1, 2, 0, 16) and first[4].shape == (1, 2, 0, 16)


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
def test_triton_eager_path_matches_the_ops_and_refuses_double_backward():
    """Eager calls skip the custom op's dispatch (a plain autograd.Function over the same launchers);
    they must give exactly what the ops and their registered autograd give."""
    case = CASES["circle text extra gqa strict"]
    q, k, v, ek, ev = make_inputs(case, torch.float32, seed=11, requires_grad=True)
    kwargs = dict(grid=case.grid, n_text=case.n_text, radius=case.radius, extra_k=ek, extra_v=ev)
    with fewstep.backend("triton"):
        out, lse = fewstep.local_window_attention(q, k, v, return_lse=True, **kwargs)
    op_out, op_lse = torch.ops.fewstep.local_window_attention_triton(q, k, v, ek, ev, *case.grid, case.n_text,
                                                                      case.radius, -1, -1, case.head_dim ** -0.5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, ek, ev), grad_out)
    op_grads = torch.autograd.grad(op_out, (q, k, v, ek, ev), grad_out)
    assert torch.equal(out, op_out) and torch.equal(lse, op_lse) and not lse.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(grads, op_grads))
    with fewstep.backend("triton"):
        out = fewstep.local_window_attention(q, k, v, **kwargs)
    (dq,) = torch.autograd.grad(out, q, grad_out.requires_grad_(), create_graph=True)  # as a gradient penalty does
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


# ---- torch.library contract and torch.compile -----------------------------------------------------

def _opcheck_samples():
    case = CASES["circle text extra gqa strict"]
    q, k, v, ek, ev = make_inputs(replace(case, grid=(3, 5), n_text=2, heads=2), torch.float32, seed=9,
                                  requires_grad=True)
    yield (q, k, v, ek, ev, 3, 5, 2, 2.0, -1, -1, 0.3)
    q, k, v, _, _ = make_inputs(CASES["window of one row"], torch.float32, seed=10, requires_grad=True)
    yield (q, k, v, None, None, 5, 3, 0, 0.0, 1, 0, 0.25)


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
def test_opcheck_triton_ops():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.fewstep.local_window_attention_triton.default, args)
        with torch.no_grad():
            out, lse = torch.ops.fewstep.local_window_attention_triton(*args)
        tensors = [t.detach() if t is not None else None for t in args[:5]]  # the backward op has no backward
        backward_args = (torch.randn_like(tensors[0]), *tensors, out, lse, *args[5:])
        torch.library.opcheck(torch.ops.fewstep.local_window_attention_triton_backward.default, backward_args)


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if TRITON_HERE else []))
def test_torch_compile_fullgraph_forward_and_backward(backend):
    case = CASES["circle text extra gqa strict"]
    q, k, v, ek, ev = make_inputs(case, torch.float32, seed=12, requires_grad=True)

    def attend(q, k, v, ek, ev):
        out = fewstep.local_window_attention(q, k, v, **case.kwargs(), extra_k=ek, extra_v=ev)
        return (out * out).sum()

    torch._dynamo.reset()
    with fewstep.backend(backend):
        eager_grads = torch.autograd.grad(attend(q, k, v, ek, ev), [q, k, v, ek, ev])
        compiled = torch.compile(attend, fullgraph=True)
        compiled_grads = torch.autograd.grad(compiled(q, k, v, ek, ev), [q, k, v, ek, ev])
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------

def _good() -> dict:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 38, 16, generator=gen)
    k, v = torch.randn(1, 2, 38, 16, generator=gen), torch.randn(1, 2, 38, 16, generator=gen)
    return dict(q=q, k=k, v=v, grid=(5, 7), n_text=3, radius=2.0)


BAD = [  # (change to the good call, exception, the full message)
    (dict(grid=(5,)), TypeError, "grid: expected (H, W), two ints, got (5,)"),
    (dict(radius=None), ValueError, "radius: expected exactly one of radius and window, got radius=None, window=None"),
    (dict(window=(1, 1)), ValueError, "radius: expected exactly one of radius and window, got radius=2.0, window=(1, 1)"),
    (dict(radius=None, window=(-1, 2)), ValueError, "window: expected (ry, rx), two ints >= 0, got (-1, 2)"),
    (dict(radius=0.5), ValueError, "radius: expected a finite number >= 1 (or 0 with a window), got 0.5"),
    (dict(radius=math.inf), ValueError, "radius: expected a finite number >= 1 (or 0 with a window), got inf"),
    (dict(radius=0), ValueError, "radius: expected a finite number >= 1 (or 0 with a window), got 0"),
    (dict(n_text=2), ValueError, "q: expected N (dim 2) = n_text + grid_h * grid_w = 2 + 5 * 7 = 37, got 38"),
    (dict(grid=(0, 7)), ValueError, "grid_h: expected >= 1, got 0"),
    (dict(n_text=-1), ValueError, "n_text: expected >= 0, got -1"),
    (dict(scale=-1.0), ValueError, "scale: expected a finite number > 0, got -1"),
    (dict(q=torch.randn(4, 38, 16)), ValueError, "q: expected a 4-D tensor [B, heads, N, D], got shape [4, 38, 16]"),
    (dict(k=torch.randn(1, 3, 38, 16), v=torch.randn(1, 3, 38, 16)), ValueError,
     "k: expected kv_heads (dim 1) dividing the 4 heads of q, got 3"),
    (dict(k=torch.randn(1, 2, 37, 16)), ValueError,
     "k: expected shape [1, kv_heads, 38, 16] (B, N and D of q), got [1, 2, 37, 16]"),
    (dict(k=torch.randn(1, 2, 38, 16, dtype=torch.float64)), TypeError,
     "k: expected dtype torch.float32 (the dtype of q), got torch.float64"),
    (dict(v=torch.randn(1, 2, 38, 8)), ValueError, "v: expected shape [1, 2, 38, 16] (the shape of k), got [1, 2, 38, 8]"),
    (dict(extra_k=torch.randn(1, 2, 3, 16)), ValueError, "extra_v: expected a tensor because extra_k is given, got None"),
    (dict(extra_k=torch.randn(1, 1, 3, 16), extra_v=torch.randn(1, 1, 3, 16)), ValueError,
     "extra_k: expected shape [1, 2, E, 16] (B, kv_heads and D of k), got [1, 1, 3, 16]"),
    (dict(extra_k=torch.randn(1, 2, 3, 16), extra_v=torch.randn(1, 2, 4, 16)), ValueError,
     "extra_v: expected shape [1, 2, 3, 16] (the shape of extra_k), got [1, 2, 4, 16]"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if TRITON_HERE else []))
@pytest.mark.parametrize("change,exc,message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_input_names_argument(backend, change, exc, message):
    args = {**_good(), **change}
    with fewstep.backend(backend), pytest.raises(exc) as err:
        fewstep.local_window_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert str(err.value).splitlines()[0] == message  # same words from the C++ and the Python checks


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
def test_triton_limits_and_fake_checks():
    good = _good()
    q, k, v = good["q"], good["k"], good["v"]
    with fewstep.backend("triton"):
        with pytest.raises(TypeError, match=r"^q: expected dtype in \['torch.float16', 'torch.bfloat16', "
                                            r"'torch.float32'\], got torch.float64$"):
            fewstep.local_window_attention(q.double(), k.double(), v.double(), grid=(5, 7), n_text=3, radius=2.0)
        for head_dim, row_bytes in [(18, 72), (264, 1056)]:  # rows TMA cannot address; wider than the tiles
            with pytest.raises(ValueError, match=rf"^q: expected a head dim \(dim 3\) of at most 256 whose rows are a "
                                                 rf"multiple of 16 bytes on the triton backend \(TMA\), got {head_dim} "
                                                 rf"\({row_bytes} bytes in torch.float32\)$"):
                fewstep.local_window_attention(torch.randn(1, 4, 38, head_dim), torch.randn(1, 2, 38, head_dim),
                                               torch.randn(1, 2, 38, head_dim), grid=(5, 7), n_text=3, radius=2.0)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # the fake impls check alike
        fq, fk, fv = mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v)
        for op in (torch.ops.fewstep.local_window_attention_triton, torch.ops.fewstep.local_window_attention):
            with pytest.raises(ValueError, match=r"^q: expected N \(dim 2\) = n_text \+ grid_h \* grid_w = 2 \+ 5 \* 7"):
                op(fq, fk, fv, None, None, 5, 7, 2, 2.0, -1, -1, 0.25)
        out, lse = torch.ops.fewstep.local_window_attention_triton(fq, fk, fv, None, None, 5, 7, 3, 2.0, -1, -1, 0.25)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("head_dim,dtype", [(24, torch.float32), (40, torch.float16), (12, torch.float32)])
def test_triton_head_dims_between_powers_of_two(head_dim, dtype):
    """DiT's and PixArt's head dim 72 and the like: the kernels run at the next power of two, and the
    descriptors read zeros past head_dim and clip the stores there, so no column past it is read
    into a score or written into the next row."""
    case = Case(2, 4, 2, head_dim, (7, 9), 5, n_extra=3, radius=3.5)
    inputs = make_inputs(case, dtype, seed=head_dim, requires_grad=True)
    kwargs = dict(**case.kwargs(), extra_k=inputs[3], extra_v=inputs[4])
    out, lse = run_op("triton", case, *inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(inputs), grad_out.to(dtype))
    ref_out, ref_lse = local_window_attention_reference(*inputs[:3], **kwargs)
    same_out, same_lse = local_window_attention_reference(*inputs[:3], **kwargs, dtype=dtype)
    assert_close_to_reference(out, ref_out, same_out, f"out[D={head_dim}]")
    assert_close_to_reference(lse, ref_lse, same_lse, f"lse[D={head_dim}]")
    ref = torch.autograd.grad(ref_out, list(inputs), grad_out)
    same = torch.autograd.grad(same_out, list(inputs), grad_out.to(dtype))
    for what, g, r, s in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref, same):
        assert_close_to_reference(g, r, s, f"{what}[D={head_dim}]")


def test_no_cuda_cpp_kernel_is_reported():
    good = _good()
    with fewstep.backend("cuda"), pytest.raises(fewstep.BackendUnavailableError, match="local_window_attention"):
        fewstep.local_window_attention(good["q"], good["k"], good["v"], grid=(5, 7), n_text=3, radius=2.0)


@pytest.mark.skipif(not TRITON_HERE, reason="needs triton (under TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("head_dim,case", [
    (64, Case(1, 2, 1, 64, (19, 37), 9, n_extra=3, radius=5.5)),
    (128, Case(1, 2, 1, 128, (19, 37), 9, n_extra=3, radius=5.5)),
    (64, Case(1, 4, 2, 64, (19, 23), 0, radius=6.0)),  # the GPU case without text and extra tokens
], ids=["64", "128", "64-image-only"])
def test_triton_gpu_tile_sizes_under_interpreter(monkeypatch, head_dim, case):
    """The 16-bit GPU tiles of kernel_tiles (8x8 queries and keys; 4x8 queries against 8x8 keys in
    dK/dV), run by the interpreter."""
    import fewstep.triton.local_window_attention as triton_lwa
    monkeypatch.setattr(triton_lwa, "_interpreted", lambda: False)
    inputs = make_inputs(case, torch.float16, seed=head_dim, requires_grad=True)
    q, k, v, ek, ev = inputs
    leaves = [t for t in inputs if t is not None]
    kwargs = dict(**case.kwargs(), extra_k=ek, extra_v=ev)
    out, lse = run_op("triton", case, *inputs)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.half())
    ref_out, ref_lse = local_window_attention_reference(q, k, v, **kwargs)
    same_out, same_lse = local_window_attention_reference(q, k, v, **kwargs, dtype=torch.float16)
    assert_close_to_reference(out, ref_out, same_out, "out")
    assert_close_to_reference(lse, ref_lse, same_lse, "lse")
    ref = torch.autograd.grad(ref_out, leaves, grad_out)
    same = torch.autograd.grad(same_out, leaves, grad_out.half())
    for what, g, r, s in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref, same):
        assert_close_to_reference(g, r, s, what)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gluon_kernels_are_chosen_for_hopper_cuda_tensors_only_and_get_swizzled_descriptors():
    """The Gluon kernels (GPU only) are never chosen for CPU tensors or under the interpreter. Their
    descriptors are HostDescriptors: the base address of the image tokens (past the text rows), the
    shapes and strides Triton's launcher turns into TMA descriptors, and for the first, compiling
    launch a validated Gluon descriptor with the 128-byte swizzled block layout the kernels' wgmmas
    read, built once per block shape and dtype."""
    from fewstep.triton import local_window_attention as lwa
    q = torch.randn(1, 2, 7 + 9 * 11, 128, dtype=torch.bfloat16)
    assert not lwa.gluon_supported(q)
    image = lwa._image(q, 7, 9, 11, 8, 8, gluon=True)
    text = lwa._sequence(q, 7, 64, gluon=True)
    assert image.base.data_ptr() == q[:, :, 7:].data_ptr() and text.base.data_ptr() == q.data_ptr()
    assert image.shape == [2, 9, 11, 128] and image.strides == [(7 + 99) * 128, 11 * 128, 128, 1]
    assert text.shape == [2, 7, 128] and text.strides == [(7 + 99) * 128, 128, 1] and image.padding == "zero"
    assert image.specialization() == (torch.bfloat16, (1, 8, 8, 128))
    real_image, real_text = image.descriptor(), text.descriptor()
    assert real_image.block_shape == [1, 8, 8, 128] and real_image.base.data_ptr() == image.data_ptr()
    assert real_text.block_shape == [1, 64, 128] and real_text.shape == text.shape
    for desc in (real_image, real_text):
        assert desc.layout.swizzle_byte_width == 128 and desc.layout.element_bitwidth == 16
    assert lwa._image(q, 7, 9, 11, 8, 8, gluon=True).descriptor().layout is real_image.layout  # cached


def test_direct_launch_key_separates_what_triton_specialises():
    """The direct launch path reuses a compiled kernel only for arguments Triton would bind to the
    same specialisation: descriptors by dtype and block, pointers by dtype and 16-byte alignment,
    integers by value unless the kernel leaves them unspecialised, compiled-out arguments as None."""
    from fewstep.triton import direct_launch
    q = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    runtime = frozenset({3})
    desc = direct_launch.HostDescriptor(q, 64, [6, 39, 64], [40 * 64, 64, 1], [1, 64, 64])
    assert direct_launch._arg_key(0, desc, runtime) == (torch.float16, (1, 64, 64))
    lse = torch.empty(100)
    assert direct_launch._arg_key(1, lse, runtime) == (torch.float32, True)
    assert direct_launch._arg_key(1, lse[1:], runtime) == (torch.float32, False)
    assert direct_launch._arg_key(3, 17, runtime) == direct_launch._arg_key(3, 32, runtime)
    assert direct_launch._arg_key(2, 17, runtime) != direct_launch._arg_key(2, 32, runtime)
    assert direct_launch._arg_key(4, None, runtime) is None and direct_launch._arg_key(5, 0.5, runtime) == "f"
    with pytest.raises(TypeError, match="argument 6: no launch key for str"):
        direct_launch._arg_key(6, "x", runtime)


def test_gluon_kernels_only_under_the_triton_versions_they_were_tested_with():
    from fewstep.triton import local_window_attention as lwa
    assert lwa.gluon_tested_with("3.6.0") and lwa.gluon_tested_with("3.6.1+git1234")
    assert not lwa.gluon_tested_with("3.9.0") and not lwa.gluon_tested_with("3.5.1")
    assert not lwa.gluon_tested_with("3.60.0")
