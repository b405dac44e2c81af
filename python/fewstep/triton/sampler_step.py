"""Triton kernel of the fused sampler step, as ``torch.ops.fewstep.sampler_step_triton``.

Same semantics and argument order as ``torch.ops.fewstep.sampler_step``
(:mod:`fewstep.reference.sampler_step`). fp16/bf16 compute in fp32. One fixed block size
(no autotuning): the step is a streaming kernel and Triton's interpreter cannot autotune.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch

from fewstep import _checks
from fewstep.ops.sampler_step_checks import check_step_args
from fewstep.reference.sampler_step import COEFF_NAMES

BLOCK = 2048
NUM_WARPS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sampler_step_kernel(x_ptr, m_ptr, u_ptr, z_ptr, p_ptr, r_ptr, out_ptr, x0_ptr, numel, per_sample,
                            k_churn, a_x, a_m, c_xt, c_m, c_0, o_p, o_z, d_x, d_0, w, clip,
                            HAS_U: tl.constexpr, HAS_Z: tl.constexpr, HAS_P: tl.constexpr,
                            HAS_R: tl.constexpr, WRITE_X0: tl.constexpr, CLIP: tl.constexpr,
                            BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        if HAS_U:
            u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
            m = u + w * (m - u)
        if HAS_R:
            m = m * tl.load(r_ptr + offs // per_sample, mask=mask)
        z = tl.zeros_like(x)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask).to(tl.float32)
        xt = x + k_churn * z
        x0 = a_x * xt + a_m * m
        if CLIP:
            x0 = tl.where(x0 < -clip, -clip, tl.where(x0 > clip, clip, x0))
        out = c_xt * xt + c_m * m + c_0 * x0 + o_z * z
        if HAS_P:
            out += o_p * tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + offs, (d_x * xt + d_0 * x0).to(x0_ptr.dtype.element_ty), mask=mask)

    return triton, sampler_step_kernel


def _check_args(x, *rest) -> None:
    """The op's checks (shared with the C++ op), plus Triton's dtypes: it computes in fp32, no float64."""
    _checks.check_tensor("x", x, dtypes=_DTYPES)
    check_step_args(x, *rest)


def _folded(coeffs: list[float]) -> list[float]:
    """The coefficients with eps folded into the output's (as the C++ kernels do): three
    multiply-adds fewer per element."""
    c = dict(zip(COEFF_NAMES, coeffs))
    return [c["k_churn"], c["a_x"], c["a_m"], c["o_x"] + c["o_e"] * c["e_x"], c["o_m"] + c["o_e"] * c["e_m"],
            c["o_0"] + c["o_e"] * c["e_0"], c["o_p"], c["o_z"], c["d_x"], c["d_0"]]


@torch.library.custom_op("fewstep::sampler_step_triton", mutates_args=())
def sampler_step_triton(x: torch.Tensor, model_output: torch.Tensor, uncond: Optional[torch.Tensor],
                        noise: Optional[torch.Tensor], prev_x0: Optional[torch.Tensor],
                        cfg_rescale: Optional[torch.Tensor], coeffs: list[float], guidance_scale: float,
                        clip_x0: float, return_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs, guidance_scale, clip_x0, return_x0)
    triton, kernel = _kernel()
    contiguous = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    x, model_output = x.contiguous(), model_output.contiguous()
    u, z, p = contiguous(uncond), contiguous(noise), contiguous(prev_x0)
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else x.new_empty(0)
    numel = x.numel()
    per_sample = numel // (x.shape[0] if x.dim() else 1)
    grid = (triton.cdiv(numel, BLOCK),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](x, model_output, u if u is not None else x, z if z is not None else x,
                     p if p is not None else x, cfg_rescale if cfg_rescale is not None else x,
                     out, x0 if return_x0 else out, numel, per_sample, *_folded(coeffs),
                     guidance_scale, clip_x0 if math.isfinite(clip_x0) else 0.0,
                     HAS_U=u is not None, HAS_Z=z is not None, HAS_P=p is not None,
                     HAS_R=cfg_rescale is not None, WRITE_X0=return_x0, CLIP=math.isfinite(clip_x0),
                     BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, x0


@sampler_step_triton.register_fake
def _(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs, guidance_scale, clip_x0,
      return_x0):
    _check_args(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs, guidance_scale, clip_x0, return_x0)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x, memory_format=torch.contiguous_format) if return_x0 else x.new_empty(0)
    return out, x0

