"""SaRA sparse ops: gather and multi-tensor sparse AdamW against the reference."""
from __future__ import annotations

import re

import pytest
import torch
from helpers import HAS_CUDA, assert_close_to_reference, devices

import fewstep
from fewstep.finetune.selection import TensorSelection
from fewstep.ops.sara import sara_adamw_step_, sara_gather_
from fewstep.reference.sara import FORMAT_BITMASK, FORMAT_INDICES, LAYOUT_COLS, pack_bitmask, unpack_bitmask

LOW_PRECISION = (torch.float16, torch.bfloat16)


def random_selection(numel: int, density: float, fmt: int, device, gen) -> TensorSelection:
    mask = torch.rand(numel, generator=gen) < density
    if fmt == FORMAT_BITMASK:
        words, offsets = pack_bitmask(mask)
        return TensorSelection(FORMAT_BITMASK, numel, int(mask.sum()), words.to(device), offsets.to(device))
    idx = mask.nonzero().squeeze(1).to(torch.int32)
    return TensorSelection(FORMAT_INDICES, numel, idx.numel(), idx.to(device), torch.empty(0, dtype=torch.int32,
                                                                                                device=device))


def test_bitmask_round_trip_odd_sizes():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 31, 32, 33, 1023, 1024, 1025, 5000):
        mask = torch.rand(n, generator=gen) < 0.4
        words, offsets = pack_bitmask(mask)
        assert words.numel() == -(-n // 32) and offsets.numel() == -(-n // 1024)
        assert torch.equal(unpack_bitmask(words, n), mask)
        counts = torch.nn.functional.pad(mask, (0, offsets.numel() * 1024 - n)).view(-1, 1024).sum(-1)
        assert torch.equal(offsets.long(), torch.cumsum(counts, 0) - counts)


def test_selection_picks_the_smaller_format():
    gen = torch.Generator().manual_seed(1)
    sparse = TensorSelection.from_mask(torch.rand(10000, generator=gen) < 0.01)
    dense = TensorSelection.from_mask(torch.rand(10000, generator=gen) < 0.2)
    assert sparse.format == FORMAT_INDICES and sparse.nbytes == 4 * sparse.k
    assert dense.format == FORMAT_BITMASK and dense.nbytes < 4 * dense.k


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", [FORMAT_INDICES, FORMAT_BITMASK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_matches_reference(device, fmt, dtype):
    gen = torch.Generator().manual_seed(2)
    for shape in [(1,), (7, 33), (3, 5, 71), (1030,)]:
        numel = torch.Size(shape).numel()
        sel = random_selection(numel, 0.3, fmt, device, gen)
        # a transposed (non-contiguous) gradient view
        base = torch.randn(shape[::-1], generator=gen).to(device, dtype)
        grad = base.permute(*reversed(range(base.dim())))
        start = torch.randn(sel.k, generator=gen).to(device)  # accumulates into existing values
        out = start.clone()
        sara_gather_(grad, out, sel.data, sel.chunk_offsets, fmt, 0.75)
        idx = sel.indices()
        expected = start.double() + 0.75 * grad.reshape(-1)[idx].double()
        in_fp32 = start + 0.75 * grad.reshape(-1)[idx].float()
        if sel.k:
            assert_close_to_reference(out, expected, in_fp32, f"gather {shape}")


def make_problem(device, gen, dtypes, fmts, sizes, density=0.3):
    weights, sels, rows = [], [], []
    compact = master = sel_len = chunk_len = 0
    for dtype, fmt, n in zip(dtypes, fmts, sizes):
        weights.append(torch.randn(n, generator=gen).to(device, dtype))
        s = random_selection(n, density, fmt, device, gen)
        sels.append(s)
        low = dtype != torch.float32
        rows.append([fmt, n, s.k, compact, master if low else -1, sel_len, chunk_len])
        compact += s.k
        master += s.k if low else 0
        sel_len += s.data.numel()
        chunk_len += s.chunk_offsets.numel()
    layout = torch.tensor(rows, dtype=torch.int64).reshape(-1, LAYOUT_COLS)
    selection = torch.cat([s.data for s in sels])
    chunks = torch.cat([s.chunk_offsets for s in sels])
    m_init = [w.reshape(-1)[s.indices()].float() for w, s, r in zip(weights, sels, rows) if r[4] >= 0]
    master_t = torch.cat(m_init) if m_init else torch.empty(0, device=device)
    return weights, sels, layout, selection, chunks, master_t, compact


HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)


@pytest.mark.parametrize("device", devices())
def test_adamw_matches_reference_over_steps(device):
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    fmts = [FORMAT_BITMASK, FORMAT_INDICES, FORMAT_BITMASK, FORMAT_INDICES, FORMAT_BITMASK]
    sizes = [1, 2049, 333, 1500, 4097]
    weights, sels, layout, selection, chunks, master, k = make_problem(device, gen, dtypes, fmts, sizes)
    before = [w.clone() for w in weights]
    ref_w = [w.clone() for w in weights]
    m, v = torch.zeros(k, device=device), torch.zeros(k, device=device)
    m64, v64, master64 = m.double(), v.double(), master.double()
    m32, v32, master32, ref32_w = m.clone(), v.clone(), master.clone(), [w.clone() for w in weights]
    for step in range(1, 4):
        grad = torch.randn(k, generator=gen).to(device)
        sara_adamw_step_(weights, m, v, master, grad, layout, selection, chunks, step=step, **HYPER)
        with fewstep.backend("reference"):
            sara_adamw_step_(ref_w, m64, v64, master64, grad.double(), layout, selection, chunks, step=step, **HYPER)
            sara_adamw_step_(ref32_w, m32, v32, master32, grad, layout, selection, chunks, step=step, **HYPER)
    assert_close_to_reference(m, m64, m32, "exp_avg")
    assert_close_to_reference(v, v64, v32, "exp_avg_sq")
    if master.numel():
        assert_close_to_reference(master, master64, master32, "master")
    for i, (w, w0, r32, s) in enumerate(zip(weights, before, ref32_w, sels)):
        mask = s.dense_mask()
        assert torch.equal(w.reshape(-1)[~mask], w0.reshape(-1)[~mask]), f"weights[{i}]: unselected entries changed"
        if w.dtype == torch.float32:
            assert_close_to_reference(w.reshape(-1)[mask], ref_w[i].reshape(-1)[mask].double(), r32.reshape(-1)[mask],
                                      f"weights[{i}]")
    # fp16/bf16 weights hold the rounded fp32 master values
    row_of = layout.tolist()
    for w, s, row in zip(weights, sels, row_of):
        if row[4] >= 0:
            assert torch.equal(w.reshape(-1)[s.indices()], master[row[4]: row[4] + s.k].to(w.dtype))


@pytest.mark.parametrize("device", devices())
def test_adamw_many_tensors_take_several_launches(device):
    gen = torch.Generator().manual_seed(4)
    count = 700  # > kMaxTensorsPerLaunch (640)
    sizes = [int(s) for s in torch.randint(1, 90, (count,), generator=gen)]
    weights, sels, layout, selection, chunks, master, k = make_problem(
        device, gen, [torch.float32] * count, [i % 2 for i in range(count)], sizes, density=0.5)
    ref_w = [w.clone() for w in weights]
    grad = torch.randn(k, generator=gen).to(device)
    m, v = torch.zeros(k, device=device), torch.zeros(k, device=device)
    sara_adamw_step_(weights, m, v, master, grad, layout, selection, chunks, step=1, **HYPER)
    with fewstep.backend("reference"):
        sara_adamw_step_(ref_w, m.new_zeros(k), v.new_zeros(k), master, grad, layout, selection, chunks, step=1,
                         **HYPER)
    for w, r in zip(weights, ref_w):
        torch.testing.assert_close(w, r, rtol=1e-6, atol=1e-7)


def test_inconsistent_selection_never_writes_out_of_bounds():
    # chunk offsets and indices that point outside the compact buffer are skipped, not followed
    n = 3000
    grad = torch.randn(n)
    words, _ = pack_bitmask(torch.ones(n, dtype=torch.bool))
    bad_offsets = torch.full((3,), 10 ** 6, dtype=torch.int32)
    backing = torch.zeros(n + 64)
    out = backing[:n]
    torch.ops.fewstep.sara_gather_(grad, out, words, bad_offsets, FORMAT_BITMASK, 1.0)
    assert torch.count_nonzero(backing) == 0
    idx = torch.tensor([0, 5, n + 100, -3], dtype=torch.int32)
    out4 = torch.zeros(4)
    torch.ops.fewstep.sara_gather_(grad, out4, idx, torch.empty(0, dtype=torch.int32), FORMAT_INDICES, 1.0)
    assert torch.equal(out4, torch.stack([grad[0], grad[5], torch.tensor(0.0), torch.tensor(0.0)]))


def _opcheck_args(device):
    gen = torch.Generator().manual_seed(5)
    weights, sels, layout, selection, chunks, master, k = make_problem(
        device, gen, [torch.float32, torch.bfloat16], [FORMAT_BITMASK, FORMAT_INDICES], [1100, 77])
    grad = torch.randn(k, generator=gen).to(device)
    return weights, sels, layout, selection, chunks, master, grad


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    weights, sels, layout, selection, chunks, master, grad = _opcheck_args(device)
    k = grad.numel()
    torch.library.opcheck(torch.ops.fewstep.sara_adamw_step_.default,
                          (weights, torch.zeros(k, device=device), torch.zeros(k, device=device), master, grad,
                           layout, selection, chunks, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1))
    s = sels[0]
    torch.library.opcheck(torch.ops.fewstep.sara_gather_.default,
                          (torch.randn(1100, device=device), torch.zeros(s.k, device=device), s.data,
                           s.chunk_offsets, s.format, 2.0))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    weights, sels, layout, selection, chunks, master, grad = _opcheck_args(device)
    k = grad.numel()
    eager_w = [w.clone() for w in weights]

    def update(ws, m, v, mst, g):
        s = sels[0]
        sara_gather_(ws[0], g[: s.k], s.data, s.chunk_offsets, s.format, 0.5)
        sara_adamw_step_(ws, m, v, mst, g, layout, selection, chunks, step=1, **HYPER)

    torch._dynamo.reset()
    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    m1, v1, mst1 = torch.zeros(k, device=device), torch.zeros(k, device=device), master.clone()
    compiled(weights, m1, v1, mst1, grad.clone())
    m2, v2, mst2 = torch.zeros(k, device=device), torch.zeros(k, device=device), master.clone()
    update(eager_w, m2, v2, mst2, grad.clone())
    for a, b in zip(weights, eager_w):
        assert torch.equal(a, b)
    assert torch.equal(m1, m2) and torch.equal(v1, v2)


def _bad(device):
    weights, sels, layout, selection, chunks, master, grad = _opcheck_args(device)
    k = grad.numel()
    z = torch.zeros(k, device=device)
    return dict(weights=weights, exp_avg=z, exp_avg_sq=z.clone(), master=master, grad=grad, layout=layout,
                selection=selection, chunk_offsets=chunks, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, step=1)


def _call(kw):
    torch.ops.fewstep.sara_adamw_step_(*kw.values())


@pytest.mark.parametrize("change,error,message", [
    (lambda kw: kw.update(step=0), ValueError, "step: expected the 1-based count"),
    (lambda kw: kw.update(beta2=1.0), ValueError, "beta2: expected a number in [0, 1), got 1"),
    (lambda kw: kw.update(eps=0.0), ValueError, "eps: expected a finite number > 0, got 0"),
    (lambda kw: kw.update(lr=float("nan")), ValueError, "lr: expected a finite number >= 0, got nan"),
    (lambda kw: kw.update(layout=kw["layout"][:1]), ValueError, "layout: expected shape [2, 7]"),
    (lambda kw: kw.update(exp_avg=kw["exp_avg"][1:]), ValueError, "exp_avg: expected"),
    (lambda kw: kw.update(grad=kw["grad"].double()), TypeError, "grad: expected dtype torch.float32, got torch.float64"),
    (lambda kw: kw.update(selection=kw["selection"].long()), TypeError, "selection: expected dtype torch.int32"),
    (lambda kw: kw.update(master=kw["master"][:0]), ValueError, "for a torch.bfloat16 weight"),
    (lambda kw: kw.update(weights=[kw["weights"][0].double(), kw["weights"][1]]), TypeError,
     "weights[0]: expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32'], got torch.float64"),
    (lambda kw: kw.update(weights=[kw["weights"][0].view(100, 11).t(), kw["weights"][1]]), ValueError,
     "weights[0]: expected a contiguous tensor"),
    (lambda kw: kw["layout"].__setitem__((0, 2), 10 ** 6), ValueError, "layout row 0: expected 0 <= k <= 1100"),
    (lambda kw: kw["layout"].__setitem__((1, 0), 5), ValueError, "layout[:, 0]: expected 0 (sorted indices) or 1"),
])
def test_adamw_bad_input(change, error, message):
    kw = _bad("cpu")
    kw["layout"] = kw["layout"].clone()
    change(kw)
    with pytest.raises(error, match=re.escape(message)):
        _call(kw)


def test_gather_bad_input():
    grad, out = torch.randn(100), torch.zeros(10)
    idx = torch.arange(10, dtype=torch.int32)
    empty = torch.empty(0, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"selection: expected 10 sorted indices"):
        torch.ops.fewstep.sara_gather_(grad, out, idx[:9], empty, FORMAT_INDICES, 1.0)
    with pytest.raises(ValueError, match=r"selection: expected 4 bitmask words for a gradient of 100 elements, got 10"):
        torch.ops.fewstep.sara_gather_(grad, out, idx, torch.zeros(1, dtype=torch.int32), FORMAT_BITMASK, 1.0)
    with pytest.raises(TypeError, match=r"grad: expected dtype in .* got torch.int64"):
        torch.ops.fewstep.sara_gather_(grad.long(), out, idx, empty, FORMAT_INDICES, 1.0)
    with pytest.raises(TypeError, match=r"out: expected dtype torch.float32, got torch.float16"):
        torch.ops.fewstep.sara_gather_(grad, out.half(), idx, empty, FORMAT_INDICES, 1.0)
    with pytest.raises(ValueError, match=r"format: expected 0 \(sorted indices\) or 1 \(bitmask\), got 3"):
        torch.ops.fewstep.sara_gather_(grad, out, idx, empty, 3, 1.0)
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got inf"):
        torch.ops.fewstep.sara_gather_(grad, out, idx, empty, FORMAT_INDICES, float("inf"))
    with pytest.raises(ValueError, match=r"out: expected at most grad.numel\(\)=100 selected entries, got 101"):
        torch.ops.fewstep.sara_gather_(grad, torch.zeros(101), idx, empty, FORMAT_INDICES, 1.0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")
def test_device_mismatch_is_reported():
    kw = _bad("cuda")
    kw["grad"] = kw["grad"].cpu()
    with pytest.raises(ValueError, match=r"grad: expected device cuda:0, got cpu"):
        _call(kw)
