"""fewstep.finetune.SaRA: the optimizer, its checkpoints, resume and data parallel."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.multiprocessing as mp

from fewstep.finetune import SaRA, load_sara_state_dict, sara_state_dict
from fewstep.finetune.sara import THRESHOLD_PREFIX
from fewstep.reference.sara import FORMAT_BITMASK, FORMAT_INDICES


class TinyNet(torch.nn.Module):
    """Conv + linear layers of odd sizes; the 2-D weights are big enough for the rank penalty."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 9, 3, padding=1)
        self.fc1 = torch.nn.Linear(9 * 5 * 7, 97)
        self.fc2 = torch.nn.Linear(97, 70)
        self.head = torch.nn.Linear(70, 4)

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def batch(i, n=6):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 3, 5, 7, generator=g), torch.randn(n, 4, generator=g)


def loss_fn(model, x, y):
    return (model(x.to(next(model.parameters()).dtype)).float() - y).square().mean()


def train(model, opt, steps, start=0, accumulate=1, clip=None):
    for i in range(start, start + steps):
        for j in range(accumulate):
            x, y = batch(i * accumulate + j)
            (loss_fn(model, x, y) / accumulate).backward()
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()


def masks_of(opt, model):
    params = dict(model.named_parameters())
    return {n: s.dense_mask().view_as(params[n]) for n, s in opt.selections.items()}


@pytest.mark.parametrize("accumulate,clip", [(1, None), (3, 0.05)])
def test_matches_adamw_restricted_to_the_selection(accumulate, clip):
    model, ref = make_model(), make_model()
    opt = SaRA(model, ratio=0.2, lr=3e-3, weight_decay=0.1)
    masks = masks_of(opt, model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    train(model, opt, 4, accumulate=accumulate, clip=clip)
    for i in range(4):
        for j in range(accumulate):
            x, y = batch(i * accumulate + j)
            (loss_fn(ref, x, y) / accumulate).backward()
        for n, p in ref.named_parameters():
            p.grad.mul_(masks[n])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip)
        frozen = {n: p.detach().clone() for n, p in ref.named_parameters()}
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(torch.where(masks[n], p, frozen[n]))
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=2e-5, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_only_selected_entries_change_and_state_is_compact(dtype):
    model = make_model(dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SaRA(model, ratio=0.15, lr=1e-2)
    masks = masks_of(opt, model)
    x, y = batch(0)
    loss_fn(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters()), "dense gradients must be freed by the hook"
    opt.step()
    total = sum(p.numel() for p in model.parameters())
    k = opt.num_trainable
    target = int(0.15 * total)
    # fp32 magnitudes rarely tie; fp16/bf16 ones do, and ties at the k-th value are all selected
    assert target <= k <= (target + 5 if dtype == torch.float32 else 1.02 * target)
    assert opt._exp_avg.numel() == k and opt._exp_avg_sq.numel() == k and opt._grad.numel() == k
    assert opt._master.numel() == (k if dtype != torch.float32 else 0)
    assert opt._selection_data.numel() * 4 < total  # smaller than a dense bool mask
    changed = 0
    for n, p in model.named_parameters():
        assert torch.equal(p[~masks[n]], before[n][~masks[n]]), f"{n}: unselected entries changed"
        changed += int((p != before[n]).sum())
    assert changed > 0.9 * k


def test_threshold_selects_exactly_below_theta_and_formats_follow_density():
    model = make_model()
    theta = 0.004
    opt = SaRA(model, threshold=theta)
    for n, p in model.named_parameters():
        expected = int((p.detach().abs() < theta).sum())
        sel = opt.selections.get(n)
        assert (sel.k if sel is not None else 0) == expected
    sparse = SaRA(make_model(), ratio=0.01, per_tensor=True)
    dense = SaRA(make_model(), ratio=0.3, per_tensor=True)
    big = [n for n, p in make_model().named_parameters() if p.numel() > 5000]
    assert all(sparse.selections[n].format == FORMAT_INDICES for n in big)
    assert all(dense.selections[n].format == FORMAT_BITMASK for n in big)
    for n, p in make_model().named_parameters():  # per tensor: the smallest 30% of each tensor
        assert abs(dense.selections[n].k - int(0.3 * p.numel())) <= 1


def test_rank_penalty_drives_the_update():
    # With a zero data gradient, AdamW's first step moves each entry by ~lr against the sign of
    # its gradient, here lambda * (U V^T) of the masked matrix.
    model = torch.nn.Linear(90, 80, bias=False)
    torch.nn.init.normal_(model.weight, std=0.1)
    w0 = model.weight.detach().clone()
    opt = SaRA(model, ratio=0.3, lr=1e-3, weight_decay=0.0, lambda_rank=5e-3, betas=(0.9, 0.999), eps=1e-12)
    mask = masks_of(opt, model)["weight"]
    (model(torch.randn(2, 90)).sum() * 0).backward()
    opt.step()
    u, _, vh = torch.linalg.svd((w0 * mask).double(), full_matrices=False)
    subgradient = (u @ vh)[mask]
    resolved = subgradient.abs() > 1e-4  # signs of near-zero entries are within the solver's error
    assert resolved.float().mean() > 0.99
    expected = -1e-3 * torch.sign(subgradient).float()
    torch.testing.assert_close((model.weight.detach() - w0)[mask][resolved], expected[resolved], rtol=1e-3, atol=1e-7)
    assert torch.equal(model.weight.detach()[~mask], w0[~mask])
    no_penalty = torch.nn.Linear(90, 80, bias=False)
    no_penalty.weight.data.copy_(w0)
    opt0 = SaRA(no_penalty, ratio=0.3, lr=1e-3, weight_decay=0.0)
    (no_penalty(torch.randn(2, 90)).sum() * 0).backward()
    opt0.step()
    assert torch.equal(no_penalty.weight.detach(), w0)


@pytest.mark.parametrize("shape,density", [((80, 90), 0.3), ((700, 130), 0.1), ((64, 64), 1.0)])
def test_polar_factor_matches_svd(shape, density):
    from fewstep.finetune.sara import polar_factor
    g = torch.Generator().manual_seed(7)
    a = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < density)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    assert s[-1] / s.norm() > 1e-4  # within the documented resolution
    torch.testing.assert_close(polar_factor(a).double(), u @ vh, rtol=0, atol=2e-5)


def test_progressive_reselection_keeps_moments_of_entries_that_stay():
    model = make_model()
    opt = SaRA(model, threshold=0.01, lr=2e-3, progressive_step=3)
    train(model, opt, 2)
    before = {n: (s.indices(), opt._exp_avg[opt._grad_views[i].storage_offset():][: s.k].clone())
              for i, (n, s) in enumerate(opt.selections.items())}
    params = dict(model.named_parameters())
    train(model, opt, 1, start=2)  # step 3 updates, then re-selects
    assert opt.num_trainable < sum(len(idx) for idx, _ in before.values())
    after_moments = {n: (s.indices(), opt._exp_avg[opt._grad_views[i].storage_offset():][: s.k])
                     for i, (n, s) in enumerate(opt.selections.items())}
    for n, (idx, m) in after_moments.items():
        old_idx, _ = before[n]
        assert torch.isin(idx, old_idx).all(), f"{n}: re-selection may only shrink the selection"
        assert (params[n].detach().reshape(-1)[idx].abs() < 0.01).all()
        assert (m != 0).all(), f"{n}: moments of entries that stay must carry over"
    # entries dropped at re-selection are frozen from then on
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = masks_of(opt, model)
    train(model, opt, 2, start=3)
    for n, p in model.named_parameters():
        keep = masks.get(n, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~keep], frozen[n][~keep])


@pytest.mark.parametrize("lambda_rank,progressive_step", [(0.0, None), (1e-3, 3)])
def test_resume_from_state_dict_continues_exactly(lambda_rank, progressive_step):
    kwargs = dict(ratio=0.2, lr=3e-3, lambda_rank=lambda_rank, progressive_step=progressive_step)
    straight = make_model()
    opt = SaRA(straight, **kwargs)
    train(straight, opt, 6)

    first = make_model()
    opt1 = SaRA(first, **kwargs)
    train(first, opt1, 4)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = SaRA(resumed, **kwargs)  # selects from the trained weights; the state overrides it
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 2, start=4)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n}: resumed run differs from the uninterrupted one"
    assert sara_state_dict(opt2).keys() == sara_state_dict(opt).keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_only_checkpoint_reproduces_and_merges(tmp_path, dtype):
    base = make_model(dtype=dtype)
    tuned = copy.deepcopy(base)
    opt = SaRA(tuned, ratio=0.2, lr=1e-2, progressive_step=2)
    train(tuned, opt, 4)
    path = str(tmp_path / "sara.safetensors")
    sd = sara_state_dict(opt, path)
    n_values = sum(v.numel() for k, v in sd.items() if not k.startswith(THRESHOLD_PREFIX))
    assert n_values < 0.25 * sum(p.numel() for p in base.parameters())

    restored = copy.deepcopy(base)
    load_sara_state_dict(restored, path)
    for (n, a), b in zip(tuned.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), f"{n}: values-only checkpoint does not reproduce the weights"

    half = copy.deepcopy(base)
    load_sara_state_dict(half, sd, alpha=0.5)
    twice = copy.deepcopy(base)
    load_sara_state_dict(twice, [sd, sd], alpha=[0.25, 0.25])
    for b, t, h, w in zip(base.parameters(), tuned.parameters(), half.parameters(), twice.parameters()):
        expected = (b.float() + 0.5 * (t.float() - b.float())).to(dtype)
        torch.testing.assert_close(h, expected, rtol=0, atol=0)
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match=r"the base weights select \d+ entries .* is the model holding the base"):
        load_sara_state_dict(copy.deepcopy(tuned), sd)


def test_torch_compile_and_autocast_models_train_like_eager():
    eager, compiled = make_model(), make_model()
    opt_e = SaRA(eager, ratio=0.2, lr=3e-3)
    opt_c = SaRA(compiled, ratio=0.2, lr=3e-3)
    torch._dynamo.reset()
    fast = torch.compile(compiled, backend="aot_eager")
    for i in range(3):
        x, y = batch(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_fn(eager, x, y).backward()
        opt_e.step()
        opt_e.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (fast(x).float() - y).square().mean().backward()
        opt_c.step()
        opt_c.zero_grad()
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def _ddp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        opt = SaRA(model, ratio=0.2, lr=3e-3)
        for i in range(3):
            x, y = batch(i, n=8)
            loss_fn(model, x[rank::world], y[rank::world]).backward()
            opt.step()
            opt.zero_grad()
        if rank == 0:
            torch.save(model.state_dict(), result_file)
    finally:
        dist.destroy_process_group()


def test_data_parallel_two_processes_equal_one_process_on_the_full_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    single = make_model()
    opt = SaRA(single, ratio=0.2, lr=3e-3)
    for i in range(3):
        x, y = batch(i, n=8)
        # mean over each half, averaged over the halves = the full-batch mean
        (0.5 * (loss_fn(single, x[0::2], y[0::2]) + loss_fn(single, x[1::2], y[1::2]))).backward()
        opt.step()
        opt.zero_grad()
    dp = torch.load(tmp_path / "out.pt")
    for n, p in single.named_parameters():
        torch.testing.assert_close(dp[n], p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(threshold=0.0), ValueError, "threshold: expected a finite number > 0, got 0.0"),
    (dict(threshold=-1.0), ValueError, "threshold: expected a finite number > 0, got -1.0"),
    (dict(ratio=0.0), ValueError, "ratio: expected a number in (0, 1), got 0.0"),
    (dict(ratio=1.5), ValueError, "ratio: expected a number in (0, 1), got 1.5"),
    (dict(), ValueError, "threshold, ratio: expected exactly one of them, got threshold=None, ratio=None"),
    (dict(threshold=0.1, ratio=0.1), ValueError, "threshold, ratio: expected exactly one of them"),
    (dict(threshold=1e-12), ValueError, "model: no entry satisfies |w| < 1e-12 in any of its 8 parameters"),
    (dict(ratio=0.1, lr=-1.0), ValueError, "lr: expected a finite number >= 0, got -1.0"),
    (dict(ratio=0.1, betas=(0.9, 1.0)), ValueError, "betas[1]: expected a number in [0, 1), got 1.0"),
    (dict(ratio=0.1, progressive_step=0), ValueError, "progressive_step: expected None or an int >= 1, got 0"),
    (dict(ratio=0.1, params=["nope"]), ValueError, "params[0]: expected a parameter name of the model, got 'nope'"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SaRA(make_model(), **kwargs)


def test_non_float_parameters_are_rejected():
    model = make_model()
    model.steps = torch.nn.Parameter(torch.arange(5), requires_grad=False)
    with pytest.raises(TypeError, match=re.escape("params: expected parameters of dtype in ['torch.float32', "
                                                  "'torch.float16', 'torch.bfloat16'], got steps of dtype torch.int64")):
        SaRA(model, ratio=0.1, params=["steps", "fc1.weight"])
    with pytest.raises(ValueError, match="model: expected at least one float parameter that requires grad, got none"):
        SaRA(torch.nn.Module(), ratio=0.1)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got list"):
        SaRA([torch.nn.Parameter(torch.randn(3))], ratio=0.1)


def test_params_restricts_the_selection_and_freezes_nothing_else():
    model = make_model()
    opt = SaRA(model, ratio=0.2, params=["fc1.weight", model.fc2.weight])
    assert set(opt.selections) == {"fc1.weight", "fc2.weight"}
    assert model.head.weight.requires_grad  # not considered: left to the user


def test_reselect_to_nothing_is_a_clear_error():
    model = make_model()
    opt = SaRA(model, threshold=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError, match="reselect: no selected entry is below its threshold any more"):
        opt.reselect()


def test_optimizer_and_model_are_freed_when_dropped():
    import gc
    import weakref
    model = make_model()
    opt = SaRA(model, ratio=0.2)
    train(model, opt, 1)
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(model.fc1.weight)]
    del model, opt
    gc.collect()
    assert all(r() is None for r in refs), "SaRA keeps the model alive (reference cycle through its hooks)"
