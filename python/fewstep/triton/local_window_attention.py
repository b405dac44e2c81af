"""Triton kernels of local-window (CLEAR) attention, as ``torch.ops.fewstep.local_window_attention_triton``
and ``torch.ops.fewstep.local_window_attention_triton_backward``.

Same schema and semantics as the C++ ops (:mod:`fewstep.reference.local_window_attention`).
Design (docs/attention.md): FlashAttention-2 online softmax over 2-D query tiles of the image grid
(TY x TX grid positions). Operands move through TMA tensor descriptors: the image tokens as a
[B*heads, H, W, D] tensor read in [1, TY, TX, D] tiles (zeros outside the grid, stores clipped), text,
whole-sequence and extra tokens as [B*heads, n, D] row blocks; no permutation copy. Image keys are
visited as KY x KX key tiles in one flat, pipelined loop over the tiles the circle (or window)
around the query tile reaches, row of tiles by row of tiles, and the element mask is applied only
on tiles the pattern or the border cuts. Text queries are extra programs of the same launch.
Backward: delta = rowsum(dO*O), then one kernel for dK/dV per key tile (over the query tiles that
reach it, and over the heads of its GQA group) and one for dQ per query tile: every gradient
element is written by one program, no atomics, so the backward is deterministic. Grid sizes,
n_text, E and the radius are runtime scalars (not specialised), so a new resolution or radius
does not recompile. Tile sizes are fixed per head dim and dtype, from an H200 sweep (no
autotuning: Triton's interpreter cannot autotune and a tuning run per new shape would cost setup
time).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from typing import NamedTuple, Optional

import torch

from fewstep import _checks
from fewstep.ops.local_window_attention_checks import (check_backward_args, check_forward_args,
                                                       lse_dtype_for)
from fewstep.triton.direct_launch import HostDescriptor
from fewstep.triton.direct_launch import launch as direct_launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


class Tiles(NamedTuple):
    ty: int  # query tile rows (grid positions)
    tx: int  # query tile columns
    ky: int  # key tile rows
    kx: int  # key tile columns
    num_warps: int
    num_stages: int


# The Gluon kernels' fixed tiles: 8x8 grid positions (or 64 rows) on both sides, one warpgroup,
# the streamed operands in two-slot shared-memory rings.
GLUON_TILES = Tiles(8, 8, 8, 8, 4, 2)


class KernelTiles(NamedTuple):
    forward: Tiles
    kv_grad: Tiles  # the query tile is the streamed one here
    q_grad: Tiles


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_tiles(head_dim: int, dtype: torch.dtype) -> KernelTiles:
    """Tile sizes per kernel: for 16-bit inputs up to D = 128 the fastest of the H200 sweep; small
    tiles for fp32 and D = 256, whose fp32 accumulators (dK and dV of a key tile, dQ of a query tile)
    would otherwise spill heavily."""
    if _interpreted():  # small tiles: several tiles per small test grid, fast on the CPU interpreter
        return KernelTiles(Tiles(4, 8, 2, 8, 4, 1), Tiles(2, 8, 4, 8, 4, 1), Tiles(4, 8, 2, 8, 4, 1))
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: small tiles (fp32 is the accuracy mode)
        warps = 4 if head_dim <= 64 else 8
        return KernelTiles(Tiles(4, 8, 2, 8, warps, 1), Tiles(2, 8, 2, 8, warps, 1), Tiles(2, 8, 2, 8, warps, 1))
    # 16-bit, D <= 128: the fastest tiles of the H200 sweep (bench/local_window_attention_tiles_gpu.py,
    # docs/attention.md): 8x8 queries against 8x8 keys in the forward and dQ (one warpgroup, the least
    # wasted pairs on a circle), 64 keys (8x8) against 4x8 query tiles for dK/dV.
    if head_dim <= 128:
        return KernelTiles(Tiles(8, 8, 8, 8, 4, 3), Tiles(4, 8, 8, 8, 4, 2), Tiles(8, 8, 8, 8, 4, 2))
    return KernelTiles(Tiles(2, 16, 2, 16, 8, 1), Tiles(2, 16, 2, 16, 8, 1), Tiles(2, 16, 2, 16, 8, 1))


@functools.cache
def _kernels():
    import triton
    from fewstep.triton import _local_window_attention_kernels as kernels
    return triton, kernels.forward_kernel, kernels.delta_kernel, kernels.kv_grad_kernel, kernels.q_grad_kernel


def block_head_dim(head_dim: int) -> int:
    """The kernels' block width for ``head_dim``: the next power of two, at least 16 (Triton's block
    shapes are powers of two). The descriptors declare the true head dim, so TMA loads the columns
    past it as zeros (adding nothing to q.k or to p.v) and clips the stores there: DiT's and
    PixArt's 72 runs on the 128-wide attention kernels with no padding copy (the delta kernel
    compiles one more variant, shared by every head dim between powers of two)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def check_triton_args(q: torch.Tensor) -> None:
    """What the Triton kernels add to the op's checks: no float64, a head dim whose rows TMA can
    address (a multiple of 16 bytes) and that fits the kernels' tiles."""
    _checks.check_tensor("q", q, dtypes=DTYPES)
    if q.dim() == 4:
        head_dim, row_bytes = q.shape[3], q.shape[3] * q.element_size()
        if head_dim > MAX_HEAD_DIM or row_bytes % 16:
            raise ValueError(f"q: expected a head dim (dim 3) of at most {MAX_HEAD_DIM} whose rows are a multiple of "
                             f"16 bytes on the triton backend (TMA), got {head_dim} ({row_bytes} bytes in {q.dtype})")


class _Pattern(NamedTuple):
    circle: bool
    reach_y: int  # how far the pattern reaches in y (and in x for a rectangle)
    reach_x: int
    max_d2: int  # circle: the largest admitted squared distance (integer form of d^2 < r^2)


def _pattern(grid_h: int, grid_w: int, radius: float, window_h: int, window_w: int) -> _Pattern:
    if window_h >= 0:
        return _Pattern(False, min(window_h, grid_h), min(window_w, grid_w), 0)
    # d^2 < r^2 for an integer d^2 is d^2 <= ceil(r^2) - 1 (r^2 in double, as the reference); capped by the
    # grid's largest squared distance so that it fits the kernels' int32 arithmetic.
    max_d2 = min(math.ceil(radius * radius) - 1, (grid_h - 1) ** 2 + (grid_w - 1) ** 2)
    reach = math.isqrt(max_d2)
    return _Pattern(True, reach, reach, max_d2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding in tl.dot


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned, as TMA descriptors need (a contiguous view that starts
    at an odd element, e.g. ``x[1:]``, is copied)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _descriptor(t: torch.Tensor, offset: int, shape: list, strides: list, block: list, gluon: bool):
    """A host-built TMA descriptor of contiguous ``t`` from element ``offset``: Triton's, or for the
    Gluon kernels the arguments of one (direct_launch.HostDescriptor: no per-call validation)."""
    if gluon:
        return HostDescriptor(t, offset, shape, strides, block)
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t.view(-1)[offset:], shape, strides, block)


def _sequence(t: torch.Tensor, rows: int, block: int, gluon: bool = False):
    """Descriptor of rows 0..rows of a contiguous [B, heads, n, D] tensor as [B*heads, rows, D],
    read and written in [1, block, block_head_dim(D)] blocks (zeros past ``rows`` and past D, stores
    clipped there)."""
    batch, heads, n, head_dim = t.shape
    return _descriptor(t, 0, [batch * heads, max(rows, 1), head_dim], [n * head_dim, head_dim, 1],
                       [1, block, block_head_dim(head_dim)], gluon)


def _image(t: torch.Tensor, n_text: int, grid_h: int, grid_w: int, rows: int, cols: int, gluon: bool = False):
    """Descriptor of the image tokens of a contiguous [B, heads, N, D] tensor as
    [B*heads, grid_h, grid_w, D], in [1, rows, cols, block_head_dim(D)] tiles (zeros outside the
    grid and past D, stores clipped there)."""
    batch, heads, n, head_dim = t.shape
    return _descriptor(t, n_text * head_dim, [batch * heads, grid_h, grid_w, head_dim],
                       [n * head_dim, grid_w * head_dim, head_dim, 1], [1, rows, cols, block_head_dim(head_dim)],
                       gluon)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: Optional[torch.Tensor],
            extra_v: Optional[torch.Tensor], grid_h: int, grid_w: int, n_text: int, radius: float, window_h: int,
            window_w: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): checks the arguments and launches the forward kernel (the Gluon one where
    ``gluon_supported`` at head dims 65-128). The op ``fewstep::local_window_attention_triton`` runs this; eager
    autograd calls it directly (fewstep.ops.local_window_attention)."""
    check_triton_args(q)
    check_forward_args(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w, scale)
    gluon = gluon_supported(q) and block_head_dim(q.shape[3]) == 128  # at D <= 64 the Triton forward is as fast
    return launch_forward(gluon, q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w,
                          scale)


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


# Gluon is experimental and its API changes between Triton releases (3.9 renamed the TMA copies):
# the Gluon kernels run only under the Triton versions they were tested with on the GPU.
GLUON_TRITON_VERSIONS = ("3.6",)


def gluon_tested_with(triton_version: str) -> bool:
    """Whether the Gluon kernels were tested under this Triton version (major.minor)."""
    return ".".join(triton_version.split(".")[:2]) in GLUON_TRITON_VERSIONS


def gluon_supported(q: torch.Tensor) -> bool:
    """Whether the Gluon kernels (``_local_window_attention_gluon``, Hopper only) run ``q``: fp16 or
    bf16 with head dims up to 128 on an sm_90 GPU, under a Triton version they were tested with.
    fp32, D > 128, other GPUs, other Triton versions and the interpreter run the Triton kernels."""
    return (q.is_cuda and not _interpreted() and q.dtype in (torch.float16, torch.bfloat16)
            and block_head_dim(q.shape[3]) <= 128 and _is_sm90(q.device.index or 0)
            and gluon_tested_with(_kernels()[0].__version__))


def _launch(kernel, programs: int, args: tuple, gluon: bool, tiles: Tiles, block_d: int, circle: bool,
            dtype: torch.dtype) -> None:
    """One launch over a 1-D grid of ``programs``: a Gluon kernel (its tiles fixed in the kernel, one
    warpgroup) or a Triton kernel compiled for ``tiles``."""
    if gluon:
        direct_launch(kernel, programs, args, dict(HEAD_DIM=block_d, CIRCLE=circle), tiles.num_warps)
    else:
        kernel[(programs,)](*args, HEAD_DIM=block_d, TY=tiles.ty, TX=tiles.tx, KY=tiles.ky, KX=tiles.kx,
                            CIRCLE=circle, PRECISION=_precision(dtype), num_warps=tiles.num_warps,
                            num_stages=tiles.num_stages)


def launch_forward(gluon: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: Optional[torch.Tensor],
                   extra_v: Optional[torch.Tensor], grid_h: int, grid_w: int, n_text: int, radius: float,
                   window_h: int, window_w: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the Gluon (``gluon``) or the Triton forward kernel on checked arguments."""
    triton, forward_kernel, *_ = _kernels()
    if gluon:
        from fewstep.triton._local_window_attention_gluon import forward_kernel_sm90 as forward_kernel
    q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    batch, heads, n_tokens, head_dim = q.shape
    group = heads // k.shape[1]
    block_d = block_head_dim(head_dim)
    tiles = GLUON_TILES if gluon else kernel_tiles(block_d, q.dtype).forward
    block_m, block_n = tiles.ty * tiles.tx, tiles.ky * tiles.kx
    n_extra, k_ext, v_ext = 0, None, None  # None: compiled out (fewer descriptors per launch)
    if extra_k is not None:  # checked non-empty
        extra_k, extra_v = _tma_ready(extra_k), _tma_ready(extra_v)
        n_extra = extra_k.shape[2]
        k_ext, v_ext = _sequence(extra_k, n_extra, block_n, gluon), _sequence(extra_v, n_extra, block_n, gluon)
    pattern = _pattern(grid_h, grid_w, radius, window_h, window_w)
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype_for(q.dtype))
    tiles_x = triton.cdiv(grid_w, tiles.tx)
    n_text_blocks = triton.cdiv(n_text, block_m)
    n_image_tiles = triton.cdiv(grid_h, tiles.ty) * tiles_x
    query_tile = dict(n_text=n_text, grid_h=grid_h, grid_w=grid_w, rows=tiles.ty, cols=tiles.tx, gluon=gluon)
    key_tile = dict(n_text=n_text, grid_h=grid_h, grid_w=grid_w, rows=tiles.ky, cols=tiles.kx, gluon=gluon)
    args = (_sequence(q, n_text, block_m, gluon), _image(q, **query_tile), _sequence(k, n_tokens, block_n, gluon),
            _sequence(v, n_tokens, block_n, gluon), _image(k, **key_tile), _image(v, **key_tile), k_ext, v_ext,
            _sequence(out, n_text, block_m, gluon), _image(out, **query_tile), lse,
            heads, group, n_tokens, n_text, grid_h, grid_w, n_extra, tiles_x, n_text_blocks, n_image_tiles,
            batch * heads, pattern.reach_y, pattern.reach_x, pattern.max_d2, scale * LOG2E)
    with _device_guard(q):
        _launch(forward_kernel, (n_text_blocks + n_image_tiles) * batch * heads, args, gluon, tiles, block_d,
                pattern.circle, q.dtype)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: Optional[torch.Tensor],
             extra_v: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, grid_h: int, grid_w: int,
             n_text: int, radius: float, window_h: int, window_w: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dextra_k, dextra_v): checks the arguments and launches the backward kernels
    (the op ``fewstep::local_window_attention_triton_backward`` runs this)."""
    check_triton_args(q)
    check_backward_args(grad_out, q, k, v, extra_k, extra_v, out, lse, grid_h, grid_w, n_text, radius, window_h,
                        window_w, scale)
    return launch_backward(gluon_supported(q), grad_out, q, k, v, extra_k, extra_v, out, lse, grid_h, grid_w, n_text,
                           radius, window_h, window_w, scale)


def launch_backward(gluon: bool, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    extra_k: Optional[torch.Tensor], extra_v: Optional[torch.Tensor], out: torch.Tensor,
                    lse: torch.Tensor, grid_h: int, grid_w: int, n_text: int, radius: float, window_h: int,
                    window_w: int, scale: float):
    """Launches the backward kernels on checked arguments: delta, then dK/dV and dQ through the Gluon
    kernels when ``gluon``, the Triton ones otherwise."""
    triton, _, delta_kernel, kv_grad_kernel, q_grad_kernel = _kernels()
    if gluon:
        from fewstep.triton._local_window_attention_gluon import kv_grad_kernel_sm90 as kv_grad_kernel
        from fewstep.triton._local_window_attention_gluon import q_grad_kernel_sm90 as q_grad_kernel
    grad_out, q, k, v, out = (_tma_ready(t) for t in (grad_out, q, k, v, out))
    lse = lse.contiguous()
    batch, heads, n_tokens, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pattern = _pattern(grid_h, grid_w, radius, window_h, window_w)
    block_d = block_head_dim(head_dim)
    tiles, q_tiles = (GLUON_TILES, GLUON_TILES) if gluon else kernel_tiles(block_d, q.dtype)[1:]
    delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    n_rows = batch * heads * n_tokens
    delta_block = max(16, 4096 // block_d)
    block_m, block_n = tiles.ty * tiles.tx, tiles.ky * tiles.kx
    if extra_k is not None:  # checked non-empty
        extra_k, extra_v = _tma_ready(extra_k), _tma_ready(extra_v)
        dextra_k, dextra_v = torch.empty_like(extra_k), torch.empty_like(extra_v)
        n_extra = extra_k.shape[2]
        extras = [_sequence(t, n_extra, block_n, gluon) for t in (extra_k, extra_v, dextra_k, dextra_v)]
    else:
        dextra_k = k.new_empty(batch, kv_heads, 0, head_dim)
        dextra_v = v.new_empty(batch, kv_heads, 0, head_dim)
        n_extra = 0
        extras = [None] * 4  # compiled out
    with _device_guard(q):
        delta_args = (out, grad_out, delta, n_rows, head_dim)
        delta_constexprs = dict(HEAD_DIM=block_d, BLOCK=delta_block, PADDED=block_d != head_dim)
        if gluon:  # on Hopper with the Gluon kernels: the direct launch path too
            direct_launch(delta_kernel, triton.cdiv(n_rows, delta_block), delta_args, delta_constexprs, 4)
        else:
            delta_kernel[(triton.cdiv(n_rows, delta_block),)](*delta_args, **delta_constexprs)
        key_tiles_x = triton.cdiv(grid_w, tiles.kx)
        n_image_key_tiles = triton.cdiv(grid_h, tiles.ky) * key_tiles_x
        n_text_key_blocks = triton.cdiv(n_text, block_n)
        n_extra_key_blocks = triton.cdiv(n_extra, block_n)
        key_tile = dict(n_text=n_text, grid_h=grid_h, grid_w=grid_w, rows=tiles.ky, cols=tiles.kx, gluon=gluon)
        query_tile = dict(n_text=n_text, grid_h=grid_h, grid_w=grid_w, rows=tiles.ty, cols=tiles.tx, gluon=gluon)
        args = (_sequence(q, n_tokens, block_m, gluon), _sequence(grad_out, n_tokens, block_m, gluon),
                _image(q, **query_tile), _image(grad_out, **query_tile), _sequence(k, n_text, block_n, gluon),
                _sequence(v, n_text, block_n, gluon), _image(k, **key_tile), _image(v, **key_tile), extras[0], extras[1],
                _sequence(dk, n_text, block_n, gluon), _sequence(dv, n_text, block_n, gluon), _image(dk, **key_tile),
                _image(dv, **key_tile), extras[2], extras[3], lse, delta, heads, group, n_tokens, n_text, grid_h,
                grid_w, n_extra, key_tiles_x, n_text_key_blocks, n_image_key_tiles, n_extra_key_blocks,
                batch * kv_heads, pattern.reach_y, pattern.reach_x, pattern.max_d2, scale * LOG2E, scale)
        _launch(kv_grad_kernel, (n_text_key_blocks + n_image_key_tiles + n_extra_key_blocks) * batch * kv_heads, args,
                gluon, tiles, block_d, pattern.circle, q.dtype)
        block_m, block_n = q_tiles.ty * q_tiles.tx, q_tiles.ky * q_tiles.kx
        key_tile = dict(n_text=n_text, grid_h=grid_h, grid_w=grid_w, rows=q_tiles.ky, cols=q_tiles.kx, gluon=gluon)
        query_tile = dict(n_text=n_text, grid_h=grid_h, grid_w=grid_w, rows=q_tiles.ty, cols=q_tiles.tx, gluon=gluon)
        q_tiles_x = triton.cdiv(grid_w, q_tiles.tx)
        n_text_query_blocks = triton.cdiv(n_text, block_m)
        n_image_query_tiles = triton.cdiv(grid_h, q_tiles.ty) * q_tiles_x
        k_ext, v_ext = ((_sequence(extra_k, n_extra, block_n, gluon), _sequence(extra_v, n_extra, block_n, gluon))
                        if n_extra else (None, None))
        args = (_sequence(q, n_text, block_m, gluon), _sequence(grad_out, n_text, block_m, gluon),
                _image(q, **query_tile), _image(grad_out, **query_tile), _sequence(k, n_tokens, block_n, gluon),
                _sequence(v, n_tokens, block_n, gluon), _image(k, **key_tile), _image(v, **key_tile), k_ext, v_ext,
                _sequence(dq, n_text, block_m, gluon), _image(dq, **query_tile), lse, delta, heads, group, n_tokens,
                n_text, grid_h, grid_w, n_extra, q_tiles_x, n_text_query_blocks, n_image_query_tiles, batch * heads,
                pattern.reach_y, pattern.reach_x, pattern.max_d2, scale * LOG2E, scale)
        _launch(q_grad_kernel, (n_text_query_blocks + n_image_query_tiles) * batch * heads, args, gluon, q_tiles,
                block_d, pattern.circle, q.dtype)
    return dq, dk, dv, dextra_k, dextra_v


# The ops run the launchers above; their schemas come from the launchers' annotations.
local_window_attention_triton = torch.library.custom_op("fewstep::local_window_attention_triton",
                                                        mutates_args=())(forward)
local_window_attention_triton_backward = torch.library.custom_op("fewstep::local_window_attention_triton_backward",
                                                                 mutates_args=())(backward)


def compiled_kernel_count() -> int:
    """How many kernel variants Triton has compiled so far (0 under the interpreter): a new grid
    size, text length or radius must not add any."""
    kernels = list(_kernels()[1:])
    gluon = sys.modules.get("fewstep.triton._local_window_attention_gluon")
    if gluon is not None:
        kernels += [gluon.forward_kernel_sm90, gluon.kv_grad_kernel_sm90, gluon.q_grad_kernel_sm90]
    return sum(len(cache[0]) for kernel in kernels for cache in getattr(kernel, "device_caches", {}).values())
