"""The C++ CPU kernels of fewstep::local_window_attention(_backward): parity with the dense masked
reference (out, lse and every gradient), determinism, opcheck, gradcheck, and the C++ checks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_to_reference, poison_allocator
from local_window_cases import Case

import fewstep
from fewstep.ops.local_window_attention_checks import check_backward_args, check_forward_args
from fewstep.reference.local_window_attention import local_window_attention_reference


CASES = [
    Case(1, 2, 2, 8, (5, 7), 0, 0, radius=1),  # only the token itself among image keys
    Case(2, 4, 2, 9, (5, 7), 3, 0, radius=1.5, noncontiguous=True),
    Case(2, 3, 1, 16, (9, 4), 5, 2, radius=2.5, scale=0.3),
    Case(1, 2, 1, 5, (1, 6), 2, 3, radius=2.0, noncontiguous=True),  # strict: distance 2 excluded
    Case(2, 2, 2, 7, (6, 5), 4, 0, radius=50.0),  # the whole grid
    Case(1, 4, 4, 8, (9, 4), 0, 3, window=(0, 0), noncontiguous=True),
    Case(2, 2, 1, 6, (5, 7), 2, 0, window=(1, 2)),
    Case(1, 1, 1, 3, (4, 9), 1, 1, window=(2, 0), noncontiguous=True),
    Case(2, 2, 2, 8, (7, 5), 3, 0, window=(10, 10)),  # the whole grid
    Case(1, 6, 2, 12, (6, 1), 0, 2, radius=2.5, noncontiguous=True),  # one column
    # large logits (scale 1, D = 32: lse ~ 20), where an fp32 lse would cost ~1e-6 in every probability
    Case(1, 2, 1, 32, (16, 12), 20, 4, radius=5.5, scale=1.0),
    # the text block costs as much as 2.7 chunks of the backward: a chunk without any block
    Case(1, 1, 1, 8, (16, 16), 4, 0, radius=1),
    # batch * kv_heads >= 8: the backward in one chunk per kv head
    Case(1, 8, 8, 8, (5, 7), 0, 0, radius=1),
    Case(2, 8, 4, 9, (5, 7), 3, 2, radius=1.5, noncontiguous=True),
    Case(4, 2, 2, 16, (9, 4), 5, 0, window=(1, 2), scale=0.3),
    Case(8, 2, 1, 32, (16, 12), 20, 4, radius=5.5, scale=1.0),
]


def case_id(c: Case) -> str:
    shape = "x".join(map(str, c.grid))
    pattern = f"r{c.radius}" if c.radius is not None else f"w{c.window[0]}.{c.window[1]}"
    return f"{shape}-t{c.n_text}-e{c.n_extra}-{pattern}-h{c.heads}.{c.kv_heads}" + ("-nc" if c.noncontiguous else "")


def make_tensor(shape, dtype, gen, noncontiguous):
    """Random [B, heads, L, D]; non-contiguous as one third of a fused [B, L, heads, 3 * D] QKV
    projection, transposed."""
    b, h, n, d = shape
    if not noncontiguous:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    fused = torch.randn((b, n, h, 3 * d), generator=gen, dtype=torch.float64).to(dtype)
    return fused[..., d:2 * d].transpose(1, 2)


def make_inputs(c: Case, dtype, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n, d = c.seq_len, c.head_dim
    t = {
        "q": make_tensor((c.batch, c.heads, n, d), dtype, gen, c.noncontiguous),
        "k": make_tensor((c.batch, c.kv_heads, n, d), dtype, gen, c.noncontiguous),
        "v": make_tensor((c.batch, c.kv_heads, n, d), dtype, gen, c.noncontiguous),
        "extra_k": None,
        "extra_v": None,
    }
    if c.n_extra:
        t["extra_k"] = make_tensor((c.batch, c.kv_heads, c.n_extra, d), dtype, gen, c.noncontiguous)
        t["extra_v"] = make_tensor((c.batch, c.kv_heads, c.n_extra, d), dtype, gen, c.noncontiguous)
    assert c.noncontiguous != t["q"].is_contiguous()
    return t


def run_forward(c: Case, t: dict):
    poison_allocator(t["q"])
    return torch.ops.fewstep.local_window_attention(t["q"], t["k"], t["v"], t["extra_k"], t["extra_v"],
                                                    *c.pattern())


def run_backward(c: Case, t: dict, grad_out, out, lse):
    poison_allocator(t["k"])
    return torch.ops.fewstep.local_window_attention_backward(grad_out, t["q"], t["k"], t["v"], t["extra_k"],
                                                             t["extra_v"], out, lse, *c.pattern())


def reference(c: Case, t: dict, grad_out, dtype):
    """(out, lse, grads) of the dense reference computed in `dtype`; grads in the order of the op."""
    names = ["q", "k", "v"] + (["extra_k", "extra_v"] if c.n_extra else [])
    leaves = {name: t[name].detach().to(dtype).requires_grad_(True) for name in names}
    args = {**{"extra_k": None, "extra_v": None}, **leaves}
    out, lse = local_window_attention_reference(args["q"], args["k"], args["v"], grid=c.grid, radius=c.radius,
                                                window=c.window, n_text=c.n_text, extra_k=args["extra_k"],
                                                extra_v=args["extra_v"], scale=c.pattern()[-1], dtype=dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(dtype))
    return out.detach(), lse.detach(), grads


def expected_shapes(c: Case):
    q = (c.batch, c.heads, c.seq_len, c.head_dim)
    kv = (c.batch, c.kv_heads, c.seq_len, c.head_dim)
    extra = (c.batch, c.kv_heads, c.n_extra, c.head_dim)
    return [q, kv, kv, extra, extra]


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_float64_matches_reference(c):
    t = make_inputs(c, torch.float64, seed=1)
    out, lse = run_forward(c, t)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == t["q"].shape and lse.shape == t["q"].shape[:3] and out.is_contiguous()
    grad_out = make_tensor(out.shape, torch.float64, torch.Generator().manual_seed(2), c.noncontiguous)
    grads = run_backward(c, t, grad_out, out, lse)
    ref_out, ref_lse, ref_grads = reference(c, t, grad_out, torch.float64)
    # both sides are float64 sums over at most N + E terms: a few hundred eps
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    for name, g, shape, rg in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, expected_shapes(c),
                                  list(ref_grads) + [None] * (5 - len(ref_grads))):
        assert g.shape == shape and g.dtype == torch.float64 and g.is_contiguous(), name
        if rg is not None:
            torch.testing.assert_close(g, rg, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_float32_within_twice_torchs_error(c):
    t = make_inputs(c, torch.float32, seed=3)
    out, lse = run_forward(c, t)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    grad_out = make_tensor(out.shape, torch.float32, torch.Generator().manual_seed(4), c.noncontiguous)
    grads = run_backward(c, t, grad_out, out, lse)
    ref_out, ref_lse, ref_grads = reference(c, t, grad_out, torch.float64)
    f32_out, f32_lse, f32_grads = reference(c, t, grad_out, torch.float32)
    assert_close_to_reference(out, ref_out, f32_out, f"out {case_id(c)}")
    assert_close_to_reference(lse, ref_lse, f32_lse, f"lse {case_id(c)}")
    for name, g, rg, fg in zip(["dq", "dk", "dv", "dextra_k", "dextra_v"], grads, ref_grads, f32_grads):
        assert g.dtype == torch.float32
        assert_close_to_reference(g, rg, fg, f"{name} {case_id(c)}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    """fp16/bf16 are converted once and computed in fp32: the only error beyond the fp32 kernel's
    is the final rounding, so the result is the fp32 kernel's on the same values, rounded."""
    c = CASES[2]
    t = make_inputs(c, dtype, seed=5)
    out, lse = run_forward(c, t)
    t32 = {name: x.float() if x is not None else None for name, x in t.items()}
    out32, lse32 = run_forward(c, t32)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)) and torch.equal(lse, lse32)
    grad_out = make_tensor(out.shape, dtype, torch.Generator().manual_seed(6), False)
    grads = run_backward(c, t, grad_out, out, lse)
    grads32 = run_backward(c, t32, grad_out.float(), out.float(), lse)
    for g, g32 in zip(grads, grads32):
        assert g.dtype == dtype and torch.equal(g, g32.to(dtype))


@pytest.mark.parametrize("c", [Case(1, 2, 2, 16, (5, 13), 0, 0, radius=1), Case(1, 2, 2, 9, (5, 13), 0, 0, radius=1),
                               Case(2, 8, 4, 16, (5, 13), 0, 0, radius=1)], ids=["chunks", "odd-d", "one-chunk"])
def test_a_query_that_attends_only_itself_has_exactly_zero_dq_and_dk(c):
    """P = 1 and out = v exactly, so dS = P (dO . v - dO . out) must be exactly 0: the kernels sum
    the score gradient and delta in the same order (the vector reductions of the scores included)."""
    t = make_inputs(c, torch.float32, seed=11)
    out, lse = run_forward(c, t)
    assert torch.equal(out, t["v"].repeat_interleave(c.heads // c.kv_heads, dim=1))
    grad_out = make_tensor(out.shape, torch.float32, torch.Generator().manual_seed(12), False)
    dq, dk, dv, _, _ = run_backward(c, t, grad_out, out, lse)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    torch.testing.assert_close(dv, grad_out.unflatten(1, (c.kv_heads, -1)).sum(2), rtol=0, atol=0)


def test_a_nan_key_reaches_exactly_the_queries_that_attend_it():
    c = Case(1, 2, 1, 16, (6, 9), 3, 0, radius=2.5)
    t = make_inputs(c, torch.float32, seed=13)
    t["k"][0, 0, c.n_text + 2 * 9 + 4, 5] = float("nan")  # image token (2, 4)
    out, _ = run_forward(c, t)
    ref_out, _, _ = reference(c, t, torch.ones_like(out), torch.float64)
    nan_rows = torch.isnan(out).any(-1)
    assert torch.equal(nan_rows, torch.isnan(ref_out).any(-1))
    assert nan_rows[0, 0, :c.n_text].all() and 1 < nan_rows[0, 0, c.n_text:].sum() < c.grid[0] * c.grid[1]
    torch.testing.assert_close(out[~nan_rows], ref_out[~nan_rows].float(), rtol=1e-5, atol=1e-6)


def test_radius_large_is_full_attention_and_text_rows_ignore_the_window():
    c = Case(1, 2, 2, 8, (6, 7), 5, 0, radius=1.5)
    t = make_inputs(c, torch.float64, seed=7)
    full = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"])
    out_local, _ = run_forward(c, t)
    out_full, _ = run_forward(Case(1, 2, 2, 8, (6, 7), 5, 0, radius=1e9), t)
    torch.testing.assert_close(out_full, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_local[:, :, :5], full[:, :, :5], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out_local[:, :, 5:], full[:, :, 5:])


@pytest.mark.parametrize("c", [Case(2, 4, 2, 16, (11, 9), 7, 3, radius=3.5),
                               Case(2, 8, 4, 16, (11, 9), 7, 3, radius=3.5)], ids=["two-chunks", "one-chunk"])
def test_backward_is_deterministic_across_thread_counts(c):
    t = make_inputs(c, torch.float32, seed=8)
    grad_out = make_tensor((c.batch, c.heads, c.seq_len, 16), torch.float32, torch.Generator().manual_seed(9), False)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = run_forward(c, t)
            results.append((out, lse, *run_backward(c, t, grad_out, out, lse)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_gradcheck_through_the_public_function():
    c = Case(1, 2, 1, 3, (3, 4), 2, 2, radius=1.5)
    t = make_inputs(c, torch.float64, seed=10)
    leaves = [t[name].detach().requires_grad_(True) for name in ("q", "k", "v", "extra_k", "extra_v")]

    def f(q, k, v, extra_k, extra_v):
        return fewstep.local_window_attention(q, k, v, grid=c.grid, radius=c.radius, n_text=c.n_text,
                                              extra_k=extra_k, extra_v=extra_v)

    with fewstep.backend("cpu"):
        assert torch.autograd.gradcheck(f, leaves)
        rect = Case(2, 2, 2, 2, (3, 3), 1, 0, window=(1, 0))
        t2 = make_inputs(rect, torch.float64, seed=11)
        assert torch.autograd.gradcheck(
            lambda q, k, v: fewstep.local_window_attention(q, k, v, grid=rect.grid, window=rect.window,
                                                           n_text=rect.n_text, scale=0.7),
            [t2[name].requires_grad_(True) for name in ("q", "k", "v")])


def test_compiled_fullgraph_matches_eager():
    c = CASES[2]
    t = make_inputs(c, torch.float32, seed=15)

    def step(q, k, v, extra_k, extra_v):
        out = fewstep.local_window_attention(q, k, v, grid=c.grid, radius=c.radius, n_text=c.n_text,
                                             extra_k=extra_k, extra_v=extra_v, scale=c.scale)
        return (out * out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    with fewstep.backend("cpu"):
        for fn in (step, compiled):
            leaves = [t[name].detach().requires_grad_(True) for name in ("q", "k", "v", "extra_k", "extra_v")]
            loss = fn(*leaves)
            results.append([loss, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(os.environ.get("FEWSTEP_CPU_ISA") == "baseline", reason="this run is the baseline one")
def test_baseline_isa_copy_passes_the_parity_tests():
    """The kernels are compiled twice (AVX2+FMA, chosen at run time, and the compiler's baseline);
    FEWSTEP_CPU_ISA=baseline forces the baseline copy, which must pass the same tests."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", __file__, "-k",
         "matches_reference or twice_torchs or half_inputs or deterministic"],
        env={**os.environ, "FEWSTEP_CPU_ISA": "baseline"}, cwd=Path(__file__).parents[2], capture_output=True,
        text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout


@pytest.mark.parametrize("c", [CASES[2], CASES[6]], ids=case_id)
def test_opcheck(c):
    t = make_inputs(c, torch.float32, seed=12)
    args = (t["q"], t["k"], t["v"], t["extra_k"], t["extra_v"], *c.pattern())
    differentiable = [x.detach().requires_grad_(True) if x is not None else None for x in args[:5]]
    torch.library.opcheck(torch.ops.fewstep.local_window_attention.default, (*differentiable, *args[5:]))
    out, lse = torch.ops.fewstep.local_window_attention(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    # the backward op is not itself differentiable: its inputs carry no grad
    torch.library.opcheck(torch.ops.fewstep.local_window_attention_backward.default,
                          (grad_out, *args[:5], out, lse, *args[5:]))


# ---- bad input: the C++ glue's messages, and the same from the Python mirror ------------------

GOOD = Case(2, 4, 2, 8, (5, 7), 3, 2, radius=2.5)
N_GOOD = GOOD.seq_len  # 38


def forward_args(**change):
    t = make_inputs(GOOD, torch.float32, seed=14)
    args = dict(q=t["q"], k=t["k"], v=t["v"], extra_k=t["extra_k"], extra_v=t["extra_v"], grid_h=5, grid_w=7,
                n_text=3, radius=2.5, window_h=-1, window_w=-1, scale=0.25)
    args.update(change)
    return args


def q_like(shape=(2, 4, N_GOOD, 8), dtype=torch.float32):
    return torch.randn(shape).to(dtype)


BAD_FORWARD = [
    (dict(q=q_like().long()), TypeError, "q: expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32', "
                                         "'torch.float64'], got torch.int64"),
    (dict(q=q_like((2, 4, 0, 8))), ValueError, "q: expected a non-empty tensor, got shape [2, 4, 0, 8]"),
    (dict(q=q_like((8, N_GOOD, 8))), ValueError, "q: expected a 4-D tensor [B, heads, N, D], got shape [8, 38, 8]"),
    (dict(k=q_like((2, 2, N_GOOD, 8), torch.float64)), TypeError,
     "k: expected dtype torch.float32 (the dtype of q), got torch.float64"),
    (dict(k=q_like((2, 2, N_GOOD - 1, 8))), ValueError,
     "k: expected shape [2, kv_heads, 38, 8] (B, N and D of q), got [2, 2, 37, 8]"),
    (dict(k=q_like((2, 3, N_GOOD, 8)), v=q_like((2, 3, N_GOOD, 8))), ValueError,
     "k: expected kv_heads (dim 1) dividing the 4 heads of q, got 3"),
    (dict(v=q_like((2, 2, N_GOOD, 7))), ValueError, "v: expected shape [2, 2, 38, 8] (the shape of k), got [2, 2, 38, 7]"),
    (dict(v=q_like((2, 2, N_GOOD, 8), torch.float16)), TypeError,
     "v: expected dtype torch.float32 (the dtype of k), got torch.float16"),
    (dict(extra_v=None), ValueError, "extra_v: expected a tensor because extra_k is given, got None"),
    (dict(extra_k=None), ValueError, "extra_k: expected a tensor because extra_v is given, got None"),
    (dict(extra_k=q_like((2, 1, 2, 8))), ValueError,
     "extra_k: expected shape [2, 2, E, 8] (B, kv_heads and D of k), got [2, 1, 2, 8]"),
    (dict(extra_k=q_like((2, 2, 2, 8), torch.bfloat16)), TypeError,
     "extra_k: expected dtype torch.float32 (the dtype of q), got torch.bfloat16"),
    (dict(extra_v=q_like((2, 2, 3, 8))), ValueError,
     "extra_v: expected shape [2, 2, 2, 8] (the shape of extra_k), got [2, 2, 3, 8]"),
    (dict(grid_h=0), ValueError, "grid_h: expected >= 1, got 0"),
    (dict(grid_w=-2), ValueError, "grid_w: expected >= 1, got -2"),
    (dict(n_text=-1), ValueError, "n_text: expected >= 0, got -1"),
    (dict(n_text=4), ValueError, "q: expected N (dim 2) = n_text + grid_h * grid_w = 4 + 5 * 7 = 39, got 38"),
    (dict(radius=0.5), ValueError, "radius: expected a finite number >= 1 (or 0 with a window), got 0.5"),
    (dict(radius=float("nan")), ValueError, "radius: expected a finite number >= 1 (or 0 with a window), got nan"),
    (dict(radius=float("inf")), ValueError, "radius: expected a finite number >= 1 (or 0 with a window), got inf"),
    (dict(window_h=1, window_w=1), ValueError, "radius: expected 0 with a window (window_h, window_w >= 0), got 2.5"),
    (dict(window_h=1, window_w=1, radius=2.0), ValueError,
     "radius: expected 0 with a window (window_h, window_w >= 0), got 2"),
    (dict(radius=0.0, window_h=-2, window_w=1), ValueError,
     "window_h: expected >= 0 (or -1 with both, for a circle), got -2"),
    (dict(radius=0.0, window_h=1, window_w=-1), ValueError,
     "window_w: expected >= 0 (or -1 with both, for a circle), got -1"),
    (dict(scale=float("inf")), ValueError, "scale: expected a finite number > 0, got inf"),
    (dict(scale=-0.5), ValueError, "scale: expected a finite number > 0, got -0.5"),
]


@pytest.mark.parametrize("change,error,message", BAD_FORWARD, ids=[m.split(":")[0] + str(i) for i, (_, _, m)
                                                                    in enumerate(BAD_FORWARD)])
def test_bad_forward_input(change, error, message):
    args = forward_args(**change)
    with pytest.raises(error, match=re.escape(message)):
        torch.ops.fewstep.local_window_attention(*args.values())
    with pytest.raises(error, match=re.escape(message)):  # the backward checks the same arguments
        q = args["q"]
        lse = torch.zeros(q.shape[:3]) if q.dim() == 4 else torch.zeros(1)
        torch.ops.fewstep.local_window_attention_backward(q, *list(args.values())[:5], q, lse,
                                                          *list(args.values())[5:])
    with pytest.raises(error, match=re.escape(message)):  # the Python mirror (fake, Triton, reference)
        check_forward_args(*args.values())


def test_bad_backward_input():
    args = forward_args()
    out, lse = torch.ops.fewstep.local_window_attention(*args.values())
    grad_out = torch.randn_like(out)
    head, tail = list(args.values())[:5], list(args.values())[5:]
    cases = [
        ((grad_out[..., :7], *head, out, lse), ValueError,
         "grad_out: expected shape [2, 4, 38, 8] (the shape of q), got [2, 4, 38, 7]"),
        ((grad_out.double(), *head, out, lse), TypeError,
         "grad_out: expected dtype torch.float32 (the dtype of q), got torch.float64"),
        ((grad_out, *head, out[:1], lse), ValueError,
         "out: expected shape [2, 4, 38, 8] (the shape of q), got [1, 4, 38, 8]"),
        ((grad_out, *head, out, lse.double()), TypeError, "lse: expected dtype in ['torch.float32'], got torch.float64"),
        ((grad_out, *head, out, lse[:, :2]), ValueError,
         "lse: expected shape [2, 4, 38] ([B, heads, N] of q), got [2, 2, 38]"),
        ((grad_out, *head, out, lse.unsqueeze(-1)), ValueError,
         "lse: expected shape [2, 4, 38] ([B, heads, N] of q), got [2, 4, 38, 1]"),
    ]
    for call_args, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            torch.ops.fewstep.local_window_attention_backward(*call_args, *tail)
        with pytest.raises(error, match=re.escape(message)):
            check_backward_args(*call_args, *tail)
