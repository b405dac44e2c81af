"""fewstep::sampler_step and fewstep::cfg_rescale_factor against the PyTorch reference."""
from __future__ import annotations

import dataclasses
import itertools
import math
import zlib

import pytest
import torch

import fewstep
from fewstep.ops import StepCoeffs, cfg_rescale_factor, sampler_step
from fewstep.reference import cfg_rescale_factor_reference, sampler_step_reference
from helpers import HAS_CUDA, assert_close_to_reference, backends_for, devices, poison_allocator

SHAPES = [(1, 3, 5, 7), (2, 4, 17, 9), (3, 1031)]  # batch 1, odd sizes, sizes not a multiple of a vector
FLAGS = list(itertools.product([False, True], repeat=3))  # (cfg+rescale, noise+prev, clip)


def backend_dtypes(backend: str, device: str) -> list[torch.dtype]:
    if backend == "triton":
        # Triton's CPU interpreter gets bf16 arithmetic wrong; bf16 runs on the GPU only.
        return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


CASES = [(d, b, dt) for d in devices() for b in backends_for(d) for dt in backend_dtypes(b, d)]


def random_coeffs(gen: torch.Generator) -> StepCoeffs:
    return StepCoeffs(*(torch.randn(14, generator=gen, dtype=torch.float64) * 0.8).tolist())


def make_inputs(shape, dtype, device, gen, *, cfg, extras, noncontiguous=False):
    def rand():
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if noncontiguous:  # same values, transposed storage
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t.to(device=device, dtype=dtype)
    x, m = rand(), rand()
    u = rand() if cfg else None
    z = rand() if extras else None
    p = rand() if extras else None
    return x, m, u, z, p


@pytest.mark.parametrize("device,backend,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg,extras,clip", FLAGS)
def test_matches_reference(device, backend, dtype, shape, cfg, extras, clip):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, cfg, extras, clip, dtype)).encode()))  # not hash(): salted per process
    coeffs = random_coeffs(gen)
    if not extras:
        coeffs = dataclasses.replace(coeffs, k_churn=0.0, o_z=0.0, o_p=0.0)
    x, m, u, z, p = make_inputs(shape, dtype, device, gen, cfg=cfg, extras=extras, noncontiguous=len(shape) == 4)
    w, phi = (4.5, 0.7) if cfg else (1.0, 0.0)
    clip_x0 = 1.0 if clip else math.inf
    poison_allocator(x)
    with fewstep.backend(backend):
        out, den = sampler_step(x, m, coeffs, uncond=u, guidance_scale=w, guidance_rescale=phi, noise=z,
                                prev_x0=p, clip_x0=clip_x0, return_x0=True)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    rescale = cfg_rescale_factor_reference(m, u, w, phi) if cfg else None
    args = (x, m, u, z, p, rescale, coeffs.as_list(), w, clip_x0, True)
    ref_out, ref_den = sampler_step_reference(*args)  # float64 math
    same_out, same_den = sampler_step_reference(*args, compute_dtype=dtype)  # PyTorch at the input dtype
    assert_close_to_reference(out, ref_out, same_out, f"x_next[{backend},{dtype}]")
    assert_close_to_reference(den, ref_den, same_den, f"denoised[{backend},{dtype}]")


@pytest.mark.parametrize("device,backend,dtype", [c for c in CASES if c[2] == torch.float32])
def test_without_x0_output_and_scalar_only_inputs(device, backend, dtype):
    gen = torch.Generator().manual_seed(7)
    x, m, _, _, _ = make_inputs((1, 4, 9, 11), dtype, device, gen, cfg=False, extras=False)
    coeffs = StepCoeffs(a_x=1.3, a_m=-0.4, o_0=0.8, o_x=0.1, e_x=0.2, e_m=0.9, o_e=0.3)
    with fewstep.backend(backend):
        out = sampler_step(x, m, coeffs)
    ref, _ = sampler_step_reference(x, m, None, None, None, None, coeffs.as_list(), 1.0, math.inf, False)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cfg_rescale_factor(device, dtype):
    gen = torch.Generator().manual_seed(3)
    c = (torch.randn(3, 4, 33, 17, generator=gen, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    u = torch.randn(3, 4, 33, 17, generator=gen, dtype=torch.float64).to(device, dtype)
    got = cfg_rescale_factor(c, u, 7.5, 0.7)
    ref = cfg_rescale_factor_reference(c, u, 7.5, 0.7)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (3,)
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=1e-6, atol=1e-6)  # fp64 accumulation, fp32 or fp64 result
    assert (got.cpu() - 1).abs().min() > 1e-3, "rescale should change the guided output"


# ---- torch.library contract -------------------------------------------------------------------

def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(11)
    for cfg, extras, clip in [(False, False, False), (True, True, True), (True, False, False)]:
        x, m, u, z, p = make_inputs((2, 3, 5, 7), torch.float32, device, gen, cfg=cfg, extras=extras)
        coeffs = random_coeffs(gen)
        if not extras:
            coeffs = dataclasses.replace(coeffs, k_churn=0.0, o_z=0.0, o_p=0.0)
        r = torch.rand(2, generator=gen).to(device) + 0.5 if cfg else None
        for return_x0 in (False, True):
            yield (x, m, u, z, p, r, coeffs.as_list(), 3.0, 1.0 if clip else math.inf, return_x0)


@pytest.mark.parametrize("device", devices())
def test_opcheck_sampler_step(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.fewstep.sampler_step.default, args)


@pytest.mark.parametrize("device", [d for d in devices() if "triton" in backends_for(d)])
def test_opcheck_sampler_step_triton(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.fewstep.sampler_step_triton.default, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_cfg_rescale_factor(device):
    c, u = torch.randn(2, 3, 5, 7, device=device), torch.randn(2, 3, 5, 7, device=device)
    torch.library.opcheck(torch.ops.fewstep.cfg_rescale_factor.default, (c, u, 5.0, 0.7))


@pytest.mark.parametrize("device,backend", [(d, b) for d in devices() for b in backends_for(d)])
def test_torch_compile_fullgraph(device, backend):
    gen = torch.Generator().manual_seed(5)
    x, m, u, z, p = make_inputs((2, 4, 7, 9), torch.float32, device, gen, cfg=True, extras=True)
    coeffs = random_coeffs(gen)

    def two_steps(x, m, u, z, p):
        x1, d1 = sampler_step(x, m, coeffs, uncond=u, guidance_scale=5.0, guidance_rescale=0.5, noise=z,
                              prev_x0=p, return_x0=True)
        return sampler_step(x1, m, coeffs, uncond=u, guidance_scale=5.0, noise=z, prev_x0=d1)

    torch._dynamo.reset()
    with fewstep.backend(backend):
        eager = two_steps(x, m, u, z, p)
        compiled = torch.compile(two_steps, fullgraph=True)(x, m, u, z, p)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------

def _good(device="cpu"):
    x = torch.randn(2, 3, 4, device=device)
    return x, torch.randn_like(x)


@pytest.mark.parametrize("backend", backends_for("cpu") + ["reference"])
def test_bad_input_names_argument(backend):
    x, m = _good()
    c = StepCoeffs(a_x=1.0, o_0=1.0)
    cases = [
        (dict(x=x.long(), m=m), TypeError, "x: expected dtype"),
        (dict(x=x, m=m.double()), TypeError, r"model_output: expected dtype torch.float32 \(the dtype of x\), "
                                             "got torch.float64"),
        (dict(x=x, m=m[:1]), ValueError, r"model_output: expected shape \[2, 3, 4\] \(the shape of x\), got \[1, 3, 4\]"),
        (dict(x=x[:0], m=m[:0]), ValueError, "x: expected a non-empty tensor"),
        (dict(x=x, m=m.to("meta")), ValueError, "model_output: expected device cpu"),
        (dict(x=x, m=m, noise=torch.randn(3)), ValueError, "noise: expected shape"),
        (dict(x=x, m=m, uncond=m.half()), TypeError, "uncond: expected dtype torch.float32"),
        (dict(x=x, m=m, coeffs=StepCoeffs(o_z=1.0)), ValueError, "noise: expected a tensor"),
        (dict(x=x, m=m, coeffs=StepCoeffs(o_p=0.5)), ValueError, "prev_x0: expected a tensor"),
        (dict(x=x, m=m, clip_x0=0.0), ValueError, "clip_x0: expected a positive bound"),
        (dict(x=x, m=m, guidance_rescale=0.5), ValueError, "guidance_rescale: expected 0 without"),
        (dict(x=x, m=m, coeffs=[1.0] * 14), TypeError, "coeffs: expected fewstep.ops.StepCoeffs"),
    ]
    with pytest.raises(ValueError, match="coeffs.a_x: expected a finite number, got nan"):
        StepCoeffs(a_x=float("nan"))
    with fewstep.backend(backend):
        for kw, exc, msg in cases:
            args = dict(kw)
            xx, mm = args.pop("x"), args.pop("m")
            coeffs = args.pop("coeffs", c)
            with pytest.raises(exc, match=msg):
                sampler_step(xx, mm, coeffs, **args)


def test_bad_input_direct_op_call_raises_not_crashes():
    """torch.ops.fewstep.* called without the Python wrapper still checks its inputs in C++."""
    x, m = _good()
    coeffs = StepCoeffs(a_x=1.0, o_0=1.0).as_list()
    op = torch.ops.fewstep.sampler_step
    with pytest.raises(ValueError, match=r"model_output: expected shape \[2, 3, 4\]"):
        op(x, m[:1], None, None, None, None, coeffs, 1.0, math.inf, False)
    with pytest.raises(TypeError, match="uncond: expected dtype torch.float32"):
        op(x, m, m.half(), None, None, None, coeffs, 1.0, math.inf, False)
    with pytest.raises(ValueError, match="coeffs: expected 14 coefficients"):
        op(x, m, None, None, None, None, coeffs[:3], 1.0, math.inf, False)
    with pytest.raises(ValueError, match="noise: expected a tensor"):
        op(x, m, None, None, None, None, [1.0] + coeffs[1:], 1.0, math.inf, False)
    with pytest.raises(ValueError, match=r"cfg_rescale: expected shape \[2\]"):
        op(x, m, m, None, None, torch.ones(3), coeffs, 1.0, math.inf, False)
    with pytest.raises(TypeError, match=r"x: expected dtype in \['torch.float16'.*got torch.int32"):
        op(x.int(), m.int(), None, None, None, None, coeffs, 1.0, math.inf, False)
    with pytest.raises(ValueError, match="x: expected a non-empty tensor"):
        op(x[:0], m[:0], None, None, None, None, coeffs, 1.0, math.inf, False)
    with pytest.raises(ValueError, match="cond: expected at least 2 elements per sample"):
        torch.ops.fewstep.cfg_rescale_factor(x[:, :1, :1], m[:, :1, :1], 2.0, 0.5)


def test_forced_backend_unavailable_says_why(monkeypatch):
    x, m = _good()
    c = StepCoeffs(a_x=1.0, o_0=1.0)
    with fewstep.backend("cuda"), pytest.raises(fewstep.BackendUnavailableError, match="runs on CUDA tensors"):
        sampler_step(x, m, c)
    with pytest.raises(ValueError, match="fewstep.backend"):
        with fewstep.backend("fast"):
            pass
    monkeypatch.setenv("FEWSTEP_BACKEND", "reference")
    torch.testing.assert_close(sampler_step(x, m, c), x.clamp(-1e30, 1e30))  # x0 = x, out = x0
    monkeypatch.setenv("FEWSTEP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FEWSTEP_BACKEND: expected one of"):
        sampler_step(x, m, c)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not HAS_CUDA:
        with fewstep.backend("triton"), pytest.raises(fewstep.BackendUnavailableError, match="TRITON_INTERPRET"):
            sampler_step(x, m, c)


def test_build_info():
    info = fewstep.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and "compiler" in info
    assert info["cuda"] == bool(info["cuda_archs"])
    # at::parallel_for runs the CPU kernels on torch's threads only when compiled with OpenMP
    assert info["openmp"] == ("ATen parallel backend: OpenMP" in torch.__config__.parallel_info())


# ---- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,extras,clip", FLAGS)
def test_gradcheck_float64(cfg, extras, clip):
    gen = torch.Generator().manual_seed(21)
    coeffs = random_coeffs(gen)
    if not extras:
        coeffs = dataclasses.replace(coeffs, k_churn=0.0, o_z=0.0, o_p=0.0)
    inputs = [t.requires_grad_() if t is not None else None
              for t in make_inputs((2, 3, 5), torch.float64, "cpu", gen, cfg=cfg, extras=extras)]
    x, m, u, z, p = inputs

    def step(x, m, *rest):
        it = iter(rest)
        uu = next(it) if cfg else None
        zz, pp = (next(it), next(it)) if extras else (None, None)
        return sampler_step(x, m, coeffs, uncond=uu, guidance_scale=3.0 if cfg else 1.0,
                            guidance_rescale=0.6 if cfg else 0.0, noise=zz, prev_x0=pp,
                            clip_x0=1.2 if clip else math.inf, return_x0=True)

    args = [t for t in inputs if t is not None]
    with fewstep.backend("cpu"):
        assert torch.autograd.gradcheck(step, args)


@pytest.mark.parametrize("device,backend", [(d, b) for d in devices() for b in backends_for(d)])
def test_gradients_match_reference_autograd(device, backend):
    gen = torch.Generator().manual_seed(8)
    coeffs = random_coeffs(gen)
    x, m, u, z, p = make_inputs((2, 4, 9, 7), torch.float32, device, gen, cfg=True, extras=True)
    grad_out, grad_den = torch.randn_like(x), torch.randn_like(x)

    def grads(name):
        leaves = [t.detach().clone().requires_grad_() for t in (x, m, u, z, p)]
        with fewstep.backend(name):
            out, den = sampler_step(leaves[0], leaves[1], coeffs, uncond=leaves[2], guidance_scale=4.0,
                                    guidance_rescale=0.5, noise=leaves[3], prev_x0=leaves[4], clip_x0=1.0,
                                    return_x0=True)
        torch.autograd.backward([out, den], [grad_out, grad_den])
        return [t.grad for t in leaves]

    for got, ref in zip(grads(backend), grads("reference")):
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU test skipped")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_device_mismatch_on_gpu(backend):
    x = torch.randn(2, 3, 4, device="cuda")
    with fewstep.backend(backend), pytest.raises(ValueError, match="model_output: expected device cuda:0"):
        sampler_step(x, torch.randn(2, 3, 4), StepCoeffs(a_x=1.0, o_0=1.0))
    with pytest.raises(ValueError, match="model_output: expected device cuda:0"):
        torch.ops.fewstep.sampler_step(x, torch.randn(2, 3, 4), None, None, None, None,
                                       StepCoeffs(a_x=1.0).as_list(), 1.0, math.inf, False)
