"""Condition-embedding perturbation: noise statistics, scaling with d, dtypes, determinism, errors."""
from __future__ import annotations

import math

import pytest
import torch
from fewstep.finetune.cep import ConditionPerturbation, perturb_condition

TOLERANCE_SE = 6.0  # tolerance in standard errors of the estimator: a false failure is ~1e-9 likely


def _delta(d: int, n: int, gamma: float, kind: str, seed: int = 0) -> torch.Tensor:
    c = torch.zeros(n // d, d, dtype=torch.float64)
    return perturb_condition(c, gamma, kind, torch.Generator().manual_seed(seed)).flatten()


def test_uniform_noise_is_bounded_and_has_the_uniform_variance():
    d, n, gamma = 1024, 1 << 20, 1.0
    scale = gamma / math.sqrt(d)
    delta = _delta(d, n, gamma, "uniform")
    bound = float(torch.tensor(scale, dtype=torch.float32))  # the noise is drawn in float32
    assert delta.abs().max() <= bound
    assert delta.max() > 0.999 * scale and delta.min() < -0.999 * scale
    # Var(U(-s, s)) = s^2/3; the sample variance has standard error s^2 * sqrt(4 / (45 n)).
    assert abs(delta.var().item() - scale**2 / 3) < TOLERANCE_SE * scale**2 * math.sqrt(4 / (45 * n))
    assert abs(delta.mean().item()) < TOLERANCE_SE * scale / math.sqrt(3 * n)


def test_gaussian_noise_has_std_gamma_over_sqrt_d():
    d, n, gamma = 768, 768 * 1024, 1.0
    scale = gamma / math.sqrt(d)
    delta = _delta(d, n, gamma, "gaussian")
    # The sample std has standard error s / sqrt(2 n).
    assert abs(delta.std().item() - scale) < TOLERANCE_SE * scale / math.sqrt(2 * n)
    assert abs(delta.mean().item()) < TOLERANCE_SE * scale / math.sqrt(n)


@pytest.mark.parametrize("kind, unit_std", [("uniform", 1 / math.sqrt(3)), ("gaussian", 1.0)])
@pytest.mark.parametrize("d", [4, 64, 1024, 4096])
def test_noise_scale_follows_gamma_over_sqrt_of_the_last_dimension(kind, unit_std, d):
    n, gamma = 1 << 18, 2.5
    delta = _delta(d, n, gamma, kind)
    expected_std = gamma / math.sqrt(d) * unit_std
    # Relative standard error of the sample std: 1/sqrt(2n) (gaussian), sqrt(0.2/n) (uniform).
    assert delta.std().item() == pytest.approx(expected_std, rel=TOLERANCE_SE / math.sqrt(2 * n))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_shape_and_device_kept_and_input_untouched(dtype):
    c = torch.randn(2, 7, 64).to(dtype)
    before = c.clone()
    out = perturb_condition(c, 1.0, "uniform", torch.Generator().manual_seed(1))
    assert (out.dtype, out.shape, out.device) == (c.dtype, c.shape, c.device)
    assert out.data_ptr() != c.data_ptr()
    assert torch.equal(c, before)
    assert not torch.equal(out, c)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_is_drawn_and_added_in_float32_then_rounded_once(kind):
    c = torch.randn(4, 77, 256).to(torch.bfloat16)
    noise = perturb_condition(torch.zeros(4, 77, 256), 1.0, kind, torch.Generator().manual_seed(3))
    out = perturb_condition(c, 1.0, kind, torch.Generator().manual_seed(3))
    assert torch.equal(out, (c.float() + noise).to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_seeded_generator_is_deterministic(kind):
    c = torch.randn(3, 16, 32)
    first = perturb_condition(c, 1.0, kind, torch.Generator().manual_seed(7))
    again = perturb_condition(c, 1.0, kind, torch.Generator().manual_seed(7))
    other = perturb_condition(c, 1.0, kind, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_gamma_zero_is_identity_on_a_new_tensor():
    c = torch.randn(2, 5, 8)
    out = perturb_condition(c, gamma=0.0)
    assert torch.equal(out, c) and out.data_ptr() != c.data_ptr()


def test_gradient_flows_through_unchanged():
    c = torch.randn(2, 5, 8, requires_grad=True)
    perturb_condition(c).sum().backward()
    assert torch.equal(c.grad, torch.ones_like(c))


def test_module_perturbs_in_training_and_is_identity_in_eval():
    module = ConditionPerturbation(gamma=1.0, kind="gaussian", generator=torch.Generator().manual_seed(5))
    c = torch.randn(2, 5, 16)
    assert module.training
    expected = perturb_condition(c, 1.0, "gaussian", torch.Generator().manual_seed(5))
    assert torch.equal(module(c), expected)
    module.eval()
    assert module(c) is c
    assert "gamma=1.0" in repr(module) and "'gaussian'" in repr(module)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"gamma": -1.0}, ValueError, r"gamma: expected a finite number >= 0, got -1\.0"),
    ({"gamma": float("inf")}, ValueError, r"gamma: expected a finite number >= 0, got inf"),
    ({"gamma": float("nan")}, ValueError, r"gamma: .* got nan"),
    ({"gamma": "1"}, ValueError, r"gamma: .* got '1'"),
    ({"kind": "normal"}, ValueError, r"kind: expected one of \['uniform', 'gaussian'\], got 'normal'"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        perturb_condition(torch.randn(2, 4), **kwargs)
    with pytest.raises(error, match=message):
        ConditionPerturbation(**kwargs)


@pytest.mark.parametrize("c, error, message", [
    (torch.ones(2, 4, dtype=torch.int64), TypeError, r"c: expected dtype in .*, got torch\.int64"),
    ([1.0, 2.0], TypeError, r"c: expected a torch\.Tensor, got list"),
    (torch.tensor(1.0), ValueError, r"c: expected .*last dimension.*, got a 0-dim tensor"),
    (torch.ones(2, 0), ValueError, r"c: expected a non-empty tensor, got shape \[2, 0\]"),
])
def test_bad_embeddings_raise_naming_the_argument(c, error, message):
    with pytest.raises(error, match=message):
        perturb_condition(c)
    with pytest.raises(error, match=message):
        ConditionPerturbation()(c)
