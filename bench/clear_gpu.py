"""GPU benchmark of one FLUX attention layer as CLEAR fine-tunes it (bf16, B=1, 24 heads x 128, a
single-stream block: projections, q/k norms, RoPE, attention; text tokens first): diffusers' dense
processor against fewstep.clear's local processors (r = 16, 8; r = 16 with 4x4 pooled K/V).
Times are forward and forward + backward (gradients of the input and of the projections);
``x_dense`` is the dense layer's time over this one."""
from __future__ import annotations

import torch

from common import gpu_median_ms

from fewstep import clear

HEADS, HEAD_DIM, N_TEXT = 24, 128, 512
GRIDS = {"64x64 + 512 text": (64, 64), "128x128 + 512 text": (128, 128)}
PATTERNS = {"r=16": dict(radius=16), "r=8": dict(radius=8), "r=16 pooled 4x4": dict(radius=16, pooled_kv_factor=4)}


def _layer(dtype):
    from diffusers.models.transformers.transformer_flux import FluxAttention
    dim = HEADS * HEAD_DIM
    torch.manual_seed(0)
    return FluxAttention(query_dim=dim, dim_head=HEAD_DIM, heads=HEADS, out_dim=dim, bias=True, eps=1e-6,
                         pre_only=True).to("cuda", dtype)


def _rope(grid):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    h, w = grid
    ids = torch.zeros(N_TEXT + h * w, 3, device="cuda")
    ids[N_TEXT:, 1] = torch.arange(h, device="cuda").repeat_interleave(w)
    ids[N_TEXT:, 2] = torch.arange(w, device="cuda").repeat(h)
    return FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)


def _run_grid(rec, case, grid, dtype):
    rope = _rope(grid)
    x = torch.randn(1, N_TEXT + grid[0] * grid[1], HEADS * HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x).detach()
    providers = {"diffusers dense (SDPA)": _layer(dtype)}
    for name, pattern in PATTERNS.items():
        providers[f"fewstep.clear {name}"] = clear.convert(_layer(dtype), grid=grid, **pattern)
    dense = {}
    for provider, layer in providers.items():
        def forward():
            with torch.no_grad():
                layer(hidden_states=x, image_rotary_emb=rope)

        def forward_backward():
            layer(hidden_states=x, image_rotary_emb=rope).backward(grad_out)
            x.grad = None
            layer.zero_grad(set_to_none=True)

        for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            ms = gpu_median_ms(fn)
            dense.setdefault(mode, ms)
            rec.add("clear_layer", f"{case} {mode}", provider, dtype, ms, "x_dense", dense[mode] / ms)


def run(rec, dtype=torch.bfloat16):
    for case, grid in GRIDS.items():
        _run_grid(rec, case, grid, dtype)
        torch.cuda.empty_cache()
