"""GPU benchmark of local-window (CLEAR) attention, bf16, B=1, 24 heads, D=128 (issue 4's table; the
suite local_window_attention_models runs other models' heads and head dims, MODEL_CASES):
fewstep.local_window_attention against FlexAttention compiled with CLEAR's raster-order 128-token
block mask, FlexAttention with a 2-D-tiled token order (image tokens only) and dense SDPA.

Times are medians of many runs after warm-up (triton.testing.do_bench, L2 flushed), forward and
forward + backward. useful_TFLOPs counts only the query-key pairs the pattern admits: 4*D per pair
and head for the forward, 14*D for forward + backward (the backward's five products; dense SDPA:
every pair). fewstep's rows also report computed_TFLOPs, the rate on the pairs the kernels compute
(whole tiles, fewstep.triton.local_window_attention_work); bench/local_window_attention_work.py
adds the floors and the launch-order model. fewstep also
reports the first-call time of a resolution it has not seen (setup_ms) and whether that call
compiled a kernel. Each provider is guarded: one that fails prints its error and the others still
report."""
from __future__ import annotations

import math
import time
import traceback
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import gpu_median_ms, graph_replay_ms

from fewstep.triton.local_window_attention_work import admitted_pairs, kernel_work

SUITE = "local_window_attention"
DTYPE = torch.bfloat16


class Shape(NamedTuple):
    side: int  # image grid side
    n_text: int
    radius: float
    with_backward: bool  # time the backward too
    heads: int = 24
    head_dim: int = 128
    model: str = ""  # the model whose attention this is, for the report


CASES = [Shape(64, 512, 16, True), Shape(64, 512, 8, True), Shape(128, 512, 16, True), Shape(128, 512, 8, True),
         Shape(256, 512, 16, False)]
# Other models' attention shapes (suite local_window_attention_models): DiT's and PixArt's 16 heads of 72 at
# 64x64 tokens with 300 joint text tokens (PixArt itself takes its text through cross-attention), DiT-XL/2 at
# 512^2 (16 heads of 72, no text), SD3-medium at 1024^2 (24 heads of 64, 77 + 256 text tokens).
MODEL_CASES = [Shape(64, 300, 16, True, 16, 72, "16 heads of 72 (DiT, PixArt), joint text"),
               Shape(32, 0, 8, True, 16, 72, "DiT-XL/2 512px"), Shape(64, 333, 16, True, 24, 64, "SD3-medium 1024px")]
TILE_Y, TILE_X = 8, 16  # FlexAttention's 2-D-tiled order: 128-token blocks of 8 x 16 grid positions


def max_sq_distance(radius: float) -> int:
    """The largest integer squared distance d^2 < radius^2 (CLEAR's strict circle)."""
    return math.ceil(radius * radius) - 1


def clear_mask_mod(h: int, w: int, n_text: int, radius: float):
    """CLEAR's mask over raster-ordered ``[text | image]`` tokens, as a FlexAttention mask_mod."""
    max_d2 = max_sq_distance(radius)

    def mask_mod(b, head, q_idx, kv_idx):
        qi, ki = q_idx - n_text, kv_idx - n_text
        dy, dx = qi // w - ki // w, qi % w - ki % w
        return (q_idx < n_text) | (kv_idx < n_text) | (dy * dy + dx * dx <= max_d2)
    return mask_mod


def tiled_mask_mod(h: int, w: int, radius: float):
    """The circle over image tokens stored tile by tile (TILE_Y x TILE_X positions per 128-token block)."""
    max_d2 = max_sq_distance(radius)
    tiles_x = w // TILE_X

    def coords(idx):
        tile, within = idx // (TILE_Y * TILE_X), idx % (TILE_Y * TILE_X)
        return (tile // tiles_x) * TILE_Y + within // TILE_X, (tile % tiles_x) * TILE_X + within % TILE_X

    def mask_mod(b, head, q_idx, kv_idx):
        qy, qx = coords(q_idx)
        ky, kx = coords(kv_idx)
        return (qy - ky) * (qy - ky) + (qx - kx) * (qx - kx) <= max_d2
    return mask_mod


def _fwd_bwd_step(fn, inputs):
    """A forward + backward of fn(*inputs) with respect to its inputs."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(fn(*inputs))

    def step():
        torch.autograd.grad(fn(*leaves), leaves, grad)
    return step


def _time(fn, with_backward: bool, inputs):
    """(forward ms, forward+backward ms or None) of fn(*inputs)."""
    with torch.no_grad():
        fwd = gpu_median_ms(lambda: fn(*inputs))
    return fwd, gpu_median_ms(_fwd_bwd_step(fn, inputs)) if with_backward else None


def _record(rec, case, provider, times, flops_fwd):
    fwd, both = times
    rec.add(SUITE, case, provider + " fwd", DTYPE, fwd, "useful_TFLOPs", flops_fwd / (fwd * 1e-3) / 1e12)
    if both is not None:
        rec.add(SUITE, case, provider + " fwd+bwd", DTYPE, both, "useful_TFLOPs",
                3.5 * flops_fwd / (both * 1e-3) / 1e12)


def _guarded(case, provider, body):
    try:
        body()
    except Exception as e:  # noqa: BLE001  (one failing provider must not lose the others' numbers)
        print(f"{SUITE}: {case}: {provider} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              flush=True)
        traceback.print_exc()
    finally:
        torch.cuda.empty_cache()


def run(rec, cases=CASES):
    import fewstep
    from fewstep.triton.local_window_attention import (GLUON_TILES, KernelTiles, block_head_dim,
                                                       compiled_kernel_count, gluon_supported)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention


    def compiled_flex():
        # A fresh compile per mask: one compiled function reused across masks and shapes hits
        # dynamo's recompile limit and silently falls back to eager (dense math, out of memory at 128^2).
        torch._dynamo.reset()
        return torch.compile(flex_attention, dynamic=False)
    # Warm fewstep's kernels (compiled once, for every grid and radius) at a shape outside the table.
    for head_dim in sorted({shape.head_dim for shape in cases}):
        warm = torch.randn(1, 2, 7 + 5 * 9, head_dim, device="cuda", dtype=DTYPE, requires_grad=True)
        fewstep.local_window_attention(warm, warm, warm, grid=(5, 9), n_text=7, radius=3.0).sum().backward()
    torch.cuda.synchronize()
    for side, n_text, radius, with_backward, heads, head_dim, model in cases:
        h = w = side
        n = n_text + h * w
        case = f"{h}x{w}+{n_text} r={radius}" + (f", {model}: {heads} heads, D={head_dim}" if model else "")
        pairs = admitted_pairs((h, w), n_text, radius=radius)
        flops = 4 * head_dim * pairs * heads
        print(f"{SUITE}: {case}: N={n}, admitted pairs {pairs} ({100 * pairs / n ** 2:.1f}% of dense)", flush=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=DTYPE, generator=gen) for _ in range(3))

        def fewstep_provider():
            before = compiled_kernel_count()
            torch.cuda.synchronize()
            start = time.perf_counter()
            fewstep.local_window_attention(q, k, v, grid=(h, w), n_text=n_text, radius=radius)
            torch.cuda.synchronize()
            setup_ms = (time.perf_counter() - start) * 1e3
            compiles = compiled_kernel_count() - before
            rec.add(SUITE, case, "fewstep first call", DTYPE, setup_ms, "new_kernel_compiles", compiles)
            if compiles:
                print(f"{SUITE}: {case}: fewstep RECOMPILED {compiles} kernel(s) for a new resolution", flush=True)

            def attend(q, k, v):
                return fewstep.local_window_attention(q, k, v, grid=(h, w), n_text=n_text, radius=radius)
            times = _time(attend, with_backward, (q, k, v))
            _record(rec, case, "fewstep", times, flops)
            if with_backward:
                # the same step replayed as a CUDA graph: device time alone, without the host's
                # Python and launch overhead, which the eager timing includes where it is the longer
                _guarded(case, "fewstep graph", lambda: rec.add(
                    SUITE, case, "fewstep fwd+bwd, CUDA graph (device only)", DTYPE,
                    graph_replay_ms(_fwd_bwd_step(attend, (q, k, v)))))
            # the rate on the pairs the kernels compute (whole tiles): kernel efficiency apart from tile waste
            # (at the kernels' block width: a head dim between powers of two computes padded columns too; the
            # Gluon kernels on Hopper walk 8x8 query tiles in dK/dV too)
            tiles = KernelTiles(GLUON_TILES, GLUON_TILES, GLUON_TILES) if gluon_supported(q) else None
            work = kernel_work((h, w), n_text, radius=radius, head_dim=head_dim, dtype=DTYPE, tiles=tiles).flops(
                block_head_dim(head_dim), heads)
            computed = (work["forward"], work["forward"] + work["backward"])
            for direction, ms, flops_done in zip(("fwd", "fwd+bwd"), times, computed):
                if ms is not None:
                    rec.add(SUITE, case, f"fewstep {direction}, computed work", DTYPE, ms, "computed_TFLOPs",
                            flops_done / (ms * 1e-3) / 1e12)

        def flex_raster():
            torch.cuda.synchronize()
            start = time.perf_counter()
            mask = create_block_mask(clear_mask_mod(h, w, n_text, radius), None, None, n, n, device="cuda",
                                     BLOCK_SIZE=128, _compile=True)
            torch.cuda.synchronize()
            rec.add(SUITE, case, "flex raster: block mask build", DTYPE, (time.perf_counter() - start) * 1e3)

            flex = compiled_flex()

            def attend(q, k, v):
                return flex(q, k, v, block_mask=mask)
            _record(rec, case, "flex raster (CLEAR)", _time(attend, with_backward, (q, k, v)), flops)

        def flex_tiled():
            mask = create_block_mask(tiled_mask_mod(h, w, radius), None, None, h * w, h * w, device="cuda",
                                     BLOCK_SIZE=128, _compile=True)
            image = [t[:, :, n_text:].contiguous() for t in (q, k, v)]  # the order only matters to the mask
            flex = compiled_flex()

            def attend(q, k, v):
                return flex(q, k, v, block_mask=mask)
            _record(rec, case, "flex 2-D tiled, image only", _time(attend, with_backward, image),
                    4 * head_dim * admitted_pairs((h, w), radius=radius) * heads)

        def dense():
            _record(rec, case, "dense SDPA", _time(F.scaled_dot_product_attention, with_backward, (q, k, v)),
                    4 * head_dim * n * n * heads)

        for provider, body in (("fewstep", fewstep_provider), ("flex raster", flex_raster),
                               ("flex tiled", flex_tiled), ("dense SDPA", dense)):
            _guarded(case, provider, body)
        del q, k, v
