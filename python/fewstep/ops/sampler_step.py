"""``fewstep.ops.sampler_step``: one fused launch per few-step sampler update.

Semantics: :mod:`fewstep.reference.sampler_step`. Backends: ``torch.ops.fewstep.sampler_step``
(C++ CPU and CUDA kernels, csrc/sampler_step/) and ``torch.ops.fewstep.sampler_step_triton``
(python/fewstep/triton/sampler_step.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from fewstep import _C, _checks, _dispatch
from fewstep.ops.sampler_step_checks import check_rescale_args, check_step_args
from fewstep.reference.sampler_step import (COEFF_NAMES, cfg_rescale_factor_reference,
                                            sampler_step_reference)


@dataclasses.dataclass(frozen=True)
class StepCoeffs:
    """Scalar coefficients of one step (see :mod:`fewstep.reference.sampler_step`)."""

    k_churn: float = 0.0
    a_x: float = 0.0
    a_m: float = 0.0
    e_x: float = 0.0
    e_m: float = 0.0
    e_0: float = 0.0
    o_x: float = 0.0
    o_m: float = 0.0
    o_0: float = 0.0
    o_e: float = 0.0
    o_p: float = 0.0
    o_z: float = 0.0
    d_x: float = 0.0
    d_0: float = 0.0

    def __post_init__(self):
        # Checked once here, not on every step: samplers build their coefficients in set_timesteps.
        for name in COEFF_NAMES:
            _checks.check_finite(f"coeffs.{name}", getattr(self, name))
        object.__setattr__(self, "_list", [float(getattr(self, n)) for n in COEFF_NAMES])

    def as_list(self) -> list[float]:
        return list(self._list)


assert tuple(f.name for f in dataclasses.fields(StepCoeffs)) == COEFF_NAMES


def _fake_outputs(x: torch.Tensor, return_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.empty_like(x, memory_format=torch.contiguous_format) if return_x0 else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x0


if _C is not None:
    @torch.library.register_fake("fewstep::sampler_step")
    def _sampler_step_fake(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs, guidance_scale,
                           clip_x0, return_x0):
        check_step_args(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs, guidance_scale, clip_x0,
                        return_x0)
        return _fake_outputs(x, return_x0)

    @torch.library.register_fake("fewstep::cfg_rescale_factor")
    def _cfg_rescale_factor_fake(cond, uncond, guidance_scale, guidance_rescale):
        check_rescale_args(cond, uncond, guidance_scale, guidance_rescale)
        dtype = torch.float64 if cond.dtype == torch.float64 else torch.float32
        return cond.new_empty(cond.shape[0], dtype=dtype)


def _setup_step_context(ctx, inputs, output):
    x, m, u, z, p, r, coeffs, w, clip_x0, return_x0 = inputs
    ctx.save_for_backward(x, m, u, z, r)
    ctx.coeffs, ctx.w, ctx.clip_x0 = dict(zip(COEFF_NAMES, coeffs)), w, clip_x0
    ctx.has_p = p is not None


def _step_backward(ctx, grad_out, grad_den):
    """The step is affine in every input except through the clamp of x0: the gradient is a few
    scaled copies of the incoming gradients, with the clamp's mask recomputed from the inputs."""
    x, m, u, z, r = ctx.saved_tensors
    c, w = ctx.coeffs, ctx.w
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    G = grad_out.to(acc)
    H = grad_den.to(acc) if grad_den is not None and grad_den.numel() else None
    bshape = (-1,) + (1,) * (x.dim() - 1)
    guided = m.to(acc) if u is None else u.to(acc) + w * (m.to(acc) - u.to(acc))
    mv = guided * r.view(bshape) if r is not None else guided
    zv = z.to(acc) if z is not None else None
    xt = x.to(acc) + c["k_churn"] * zv if zv is not None else x.to(acc)
    g_x0 = (c["o_0"] + c["o_e"] * c["e_0"]) * G
    if H is not None:
        g_x0 = g_x0 + c["d_0"] * H
    if math.isfinite(ctx.clip_x0):
        g_x0 = g_x0 * ((c["a_x"] * xt + c["a_m"] * mv).abs() <= ctx.clip_x0)
    g_xt = (c["o_x"] + c["o_e"] * c["e_x"]) * G + c["a_x"] * g_x0
    if H is not None:
        g_xt = g_xt + c["d_x"] * H
    g_mv = (c["o_m"] + c["o_e"] * c["e_m"]) * G + c["a_m"] * g_x0
    g_r = None
    if r is not None:
        g_r = (guided * g_mv).reshape(r.shape[0], -1).sum(1).to(r.dtype)
        g_mv = g_mv * r.view(bshape)
    g_m, g_u = (g_mv, None) if u is None else (w * g_mv, (1 - w) * g_mv)
    g_z = c["o_z"] * G + c["k_churn"] * g_xt if z is not None else None
    g_p = c["o_p"] * G if ctx.has_p else None
    cast = lambda g: None if g is None else g.to(x.dtype)  # noqa: E731
    return (cast(g_xt), cast(g_m), cast(g_u), cast(g_z), cast(g_p), g_r, None, None, None, None)


def _rescale_setup(ctx, inputs, output):
    c, u, w, phi = inputs
    ctx.save_for_backward(c, u)
    ctx.w, ctx.phi = w, phi


def _rescale_backward(ctx, grad):
    c, u = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda c_, u_: cfg_rescale_factor_reference(c_, u_, ctx.w, ctx.phi).double(),
                            c.double(), u.double())
    gc, gu = vjp(grad.double())
    return gc.to(c.dtype), gu.to(u.dtype), None, None


if _C is not None:
    torch.library.register_autograd("fewstep::sampler_step", _step_backward, setup_context=_setup_step_context)
    torch.library.register_autograd("fewstep::cfg_rescale_factor", _rescale_backward, setup_context=_rescale_setup)


def cfg_rescale_factor(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                       guidance_rescale: float) -> torch.Tensor:
    """Per-sample factor ``phi * std(cond) / std(guided) + 1 - phi`` of CFG rescale (float64 for
    float64 inputs, float32 otherwise)."""
    check_rescale_args(cond, uncond, guidance_scale, guidance_rescale)
    name = _dispatch.select("cfg_rescale_factor", cond.device, has_triton=False)
    if name == "reference":
        return cfg_rescale_factor_reference(cond, uncond, guidance_scale, guidance_rescale)
    return torch.ops.fewstep.cfg_rescale_factor(cond, uncond, float(guidance_scale),
                                                float(guidance_rescale))


def sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: StepCoeffs,
    *,
    uncond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    noise: Optional[torch.Tensor] = None,
    prev_x0: Optional[torch.Tensor] = None,
    clip_x0: float = math.inf,
    return_x0: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One fused sampler update; returns ``x_next`` (and the denoised estimate if asked).

    ``model_output`` is the conditional prediction when ``uncond`` is given (CFG fused into
    the step); ``guidance_rescale`` > 0 adds CFG rescale (one extra reduction launch). Scalars are
    Python numbers: they travel to the kernel as arguments, never read back from the device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(coeffs, StepCoeffs):
        raise TypeError(f"coeffs: expected fewstep.ops.StepCoeffs, got {type(coeffs).__name__}")
    _checks.check_finite("guidance_rescale", guidance_rescale)
    rescale = None
    if guidance_rescale != 0.0:
        if uncond is None:
            raise ValueError(f"guidance_rescale: expected 0 without an unconditional output, got "
                             f"{guidance_rescale}")
        rescale = cfg_rescale_factor(model_output, uncond, guidance_scale, guidance_rescale)
    args = (x, model_output, uncond, noise, prev_x0, rescale, coeffs.as_list(),
            float(guidance_scale), float(clip_x0), bool(return_x0))
    backend = _dispatch.select("sampler_step", x.device)
    if backend == "reference":  # unfused eager PyTorch, in the kernels' compute precision
        check_step_args(*args)
        x_next, x0 = sampler_step_reference(*args, compute_dtype=torch.float64 if x.dtype == torch.float64
                                            else torch.float32)
    else:  # the C++ ops and the Triton op check their arguments themselves
        op = torch.ops.fewstep.sampler_step_triton if backend == "triton" else torch.ops.fewstep.sampler_step
        x_next, x0 = _call_maybe_below_autograd(op, args)
    return (x_next, x0) if return_x0 else x_next


def _call_maybe_below_autograd(op, args):
    """Calls ``op``; when no gradient can flow, skips its Python autograd kernel (about half the
    per-call host overhead of a small step, which dominates few-step loops)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args[:6])):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# torch.ops.fewstep.sampler_step_triton (imports triton lazily on first use); same backward.
from fewstep.triton.sampler_step import sampler_step_triton as _sampler_step_triton  # noqa: E402

_sampler_step_triton.register_autograd(_step_backward, setup_context=_setup_step_context)
