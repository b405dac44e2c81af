"""The @triton.jit kernels of local-window attention (imported on first launch, so that fewstep
imports without Triton); launched from :mod:`fewstep.triton.local_window_attention`, whose
docstring and docs/attention.md describe the design.

Every [rows, HEAD_DIM] operand block moves through a tensor descriptor (TMA on sm_90): image
tiles through 4-D descriptors [B*heads, grid_h, grid_w, D] with [1, TY, TX, D] blocks, text,
whole-sequence and extra-token blocks through 3-D ones [B*heads, n, D]. Out-of-range rows load as
zeros and are not stored, so border tiles need no pointer masks; only the softmax mask of keys
outside the grid remains.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

# Runtime integer arguments that must not be specialised (Triton otherwise compiles separate
# variants for values equal to 1 or divisible by 16): the pattern and the sizes.
RUNTIME_INTS = ["heads", "group", "n_tokens", "n_text", "grid_h", "grid_w", "n_extra", "tiles_x",
                "n_text_blocks", "n_image_tiles", "n_extra_blocks", "n_heads", "reach_y", "reach_x", "max_d2",
                "n_rows", "head_dim"]
jit = functools.partial(triton.jit, do_not_specialize=RUNTIME_INTS)
LN2_INV = tl.constexpr(1.4426950408889634)  # 1 / ln 2


@triton.jit
def x_reach(gap_y, reach_x, max_d2, CIRCLE: tl.constexpr):
    """How far in x the pattern reaches from a query at vertical distance ``gap_y``: the largest
    dx with gap_y^2 + dx^2 <= max_d2 (circle), or the window's half-width."""
    if CIRCLE:
        rest = max_d2 - gap_y * gap_y
        dx = tl.sqrt(tl.maximum(rest, 0).to(tl.float32)).to(tl.int32)
        dx = tl.where((dx + 1) * (dx + 1) <= rest, dx + 1, dx)  # exact integer square root
        return tl.where(dx * dx > rest, dx - 1, dx)
    else:
        return reach_x


@triton.jit
def admitted(qy, qx, ky, kx, reach_y, reach_x, max_d2, CIRCLE: tl.constexpr):
    """[queries, keys] image-pattern mask from grid coordinates (symmetric: swap the roles for
    [keys, queries])."""
    dy = qy[:, None] - ky[None, :]
    dx = qx[:, None] - kx[None, :]
    if CIRCLE:
        return dy * dy + dx * dx <= max_d2
    else:
        return (tl.abs(dy) <= reach_y) & (tl.abs(dx) <= reach_x)


@triton.jit
def tile_positions(y0, x0, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Grid coordinates (ys, xs) of the ROWS x COLS positions of the tile at (y0, x0), row by row."""
    offs = tl.arange(0, ROWS * COLS)
    return y0 + offs // COLS, x0 + offs % COLS


@triton.jit
def image_tile(index, tiles_x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Corner (y0, x0) and positions (ys, xs) of image tile ``index``, in raster order of tiles_x
    tiles per row."""
    y0 = (index // tiles_x) * ROWS
    x0 = (index % tiles_x) * COLS
    ys, xs = tile_positions(y0, x0, ROWS, COLS)
    return y0, x0, ys, xs


@triton.jit
def image_mask(qy, qx, ky0, kx0, grid_h, grid_w, reach_y, reach_x, max_d2, KY: tl.constexpr, KX: tl.constexpr,
               CIRCLE: tl.constexpr):
    """[queries, keys] mask of the KY x KX key tile at (ky0, kx0): the pattern, and keys inside the grid."""
    ky, kx = tile_positions(ky0, kx0, KY, KX)
    return admitted(qy, qx, ky, kx, reach_y, reach_x, max_d2, CIRCLE) & ((ky < grid_h) & (kx < grid_w))[None, :]


@triton.jit
def tile_inside(ay0, ay1, ax0, ax1, by0, by1, bx0, bx1, reach_y, reach_x, max_d2, CIRCLE: tl.constexpr):
    """Whether every position of [ay0, ay1] x [ax0, ax1] admits every one of [by0, by1] x [bx0, bx1]."""
    far_y = tl.maximum(by1 - ay0, ay1 - by0)
    far_x = tl.maximum(bx1 - ax0, ax1 - bx0)
    if CIRCLE:
        return far_y * far_y + far_x * far_x <= max_d2
    else:
        return (far_y <= reach_y) & (far_x <= reach_x)


# Tile walk: the tiles of ROWS x COLS grid positions that the pattern around a fixed rectangle
# [fy0, fy1] x [fx0, fx1] reaches, row of tiles by row of tiles, each row only over the columns
# the pattern can reach at that row's vertical gap. One flat loop of `walk_count` iterations
# advances (y0, x0) with `walk_next`, so Triton pipelines the loads across rows too.

@triton.jit
def walk_row(y0, fy0, fy1, fx0, fx1, grid_h, grid_w, reach_x, max_d2, ROWS: tl.constexpr,
             CIRCLE: tl.constexpr):
    """Column range [lo, hi) of the tile row starting at y0."""
    gap_y = tl.maximum(tl.maximum(y0 - fy1, fy0 - (tl.minimum(y0 + ROWS, grid_h) - 1)), 0)
    dx = x_reach(gap_y, reach_x, max_d2, CIRCLE)
    return tl.maximum(fx0 - dx, 0), tl.minimum(fx1 + dx + 1, grid_w)


@triton.jit
def walk_count(fy0, fy1, fx0, fx1, grid_h, grid_w, reach_y, reach_x, max_d2, ROWS: tl.constexpr,
               COLS: tl.constexpr, CIRCLE: tl.constexpr):
    """First tile row and the number of tiles of the walk."""
    y_first = tl.maximum(fy0 - reach_y, 0)
    n = 0
    for y0 in range(y_first, tl.minimum(fy1 + reach_y + 1, grid_h), ROWS):
        lo, hi = walk_row(y0, fy0, fy1, fx0, fx1, grid_h, grid_w, reach_x, max_d2, ROWS, CIRCLE)
        n += tl.cdiv(hi - lo, COLS)
    return y_first, n


@triton.jit
def walk_next(y0, x0, hi, fy0, fy1, fx0, fx1, grid_h, grid_w, reach_x, max_d2, ROWS: tl.constexpr,
              COLS: tl.constexpr, CIRCLE: tl.constexpr):
    """The tile after (y0, x0) in a row ending at hi: (y0, x0, hi) of the next tile."""
    x0 += COLS
    next_row = x0 >= hi
    y0 = tl.where(next_row, y0 + ROWS, y0)
    lo, new_hi = walk_row(y0, fy0, fy1, fx0, fx1, grid_h, grid_w, reach_x, max_d2, ROWS, CIRCLE)
    return y0, tl.where(next_row, lo, x0), tl.where(next_row, new_hi, hi)


@triton.jit
def walk_start(fy0, fx0, grid_h, grid_w, reach_y, reach_x, max_d2, FY: tl.constexpr, FX: tl.constexpr,
               ROWS: tl.constexpr, COLS: tl.constexpr, CIRCLE: tl.constexpr):
    """The walk around the fixed FY x FX tile at (fy0, fx0): the tile's last row and column inside
    the grid, the first tile (y0, x0) of the walk, the end of its first row and the number of tiles."""
    fy1 = tl.minimum(fy0 + FY, grid_h) - 1
    fx1 = tl.minimum(fx0 + FX, grid_w) - 1
    y0, n = walk_count(fy0, fy1, fx0, fx1, grid_h, grid_w, reach_y, reach_x, max_d2, ROWS, COLS, CIRCLE)
    x0, x_end = walk_row(y0, fy0, fy1, fx0, fx1, grid_h, grid_w, reach_x, max_d2, ROWS, CIRCLE)
    return fy1, fx1, y0, x0, x_end, n


@triton.jit
def load_key_tile(k_img, v_img, kv_bh, qy0, qy1, qx0, qx1, ky0, kx0, grid_h, grid_w, reach_y, reach_x, max_d2,
                  KY: tl.constexpr, KX: tl.constexpr, HEAD_DIM: tl.constexpr, CIRCLE: tl.constexpr):
    """K and V of the KY x KX key tile at (ky0, kx0), and whether the tile needs no element mask: it
    lies inside the grid and every query of [qy0, qy1] x [qx0, qx1] admits all of it. (Keys outside
    the grid load as zeros; their score 0 must not count, and in dQ their p = exp2(-lse) can
    overflow where every score of a row is very negative, and inf * 0 would be NaN.)"""
    k = load_tile(k_img, kv_bh, ky0, kx0, KY, KX, HEAD_DIM)
    v = load_tile(v_img, kv_bh, ky0, kx0, KY, KX, HEAD_DIM)
    inside = tile_inside(qy0, qy1, qx0, qx1, ky0, ky0 + KY - 1, kx0, kx0 + KX - 1, reach_y, reach_x, max_d2, CIRCLE)
    return k, v, inside & (ky0 + KY <= grid_h) & (kx0 + KX <= grid_w)


@triton.jit
def program_block(n_first_long, n_image, n_last_long, n_heads):
    """(block index, batch*heads index) of this program in a 1-D launch of ``n_heads`` x blocks.

    Per head the blocks are ``n_first_long`` text blocks, ``n_image`` image tiles and ``n_last_long``
    extra blocks, indexed in that order. The long blocks (text and extra tokens see, or are seen by,
    every token) of all heads are launched first, then each head's image tiles in grid order: with
    the head as the slow index, the text blocks of the last heads would start last and run alone
    at the end, while image tiles launched together share their neighbourhood's keys in L2."""
    pid = tl.program_id(0)
    n_long = (n_first_long + n_last_long) * n_heads
    long_block = pid // n_heads
    image_pid = tl.maximum(pid - n_long, 0)
    block = tl.where(pid < n_long, tl.where(long_block < n_first_long, long_block, long_block + n_image),
                     n_first_long + image_pid % tl.maximum(n_image, 1))
    return block, tl.where(pid < n_long, pid % n_heads, image_pid // tl.maximum(n_image, 1))


@triton.jit
def kv_head(bh, heads, group):
    """The batch*kv_heads index that query head ``bh`` reads (GQA: ``group`` query heads per kv head)."""
    return (bh // heads) * (heads // group) + (bh % heads) // group


@triton.jit
def load_tile(desc, bh, y0, x0, ROWS: tl.constexpr, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[ROWS*COLS, HEAD_DIM] image tile at grid position (y0, x0); zeros outside the grid."""
    return desc.load([bh, y0, x0, 0]).reshape(ROWS * COLS, HEAD_DIM)


@triton.jit
def load_block(desc, bh, row0, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[BLOCK, HEAD_DIM] contiguous rows from row0 of a [B*heads, n, D] descriptor; zeros past n."""
    return desc.load([bh, row0, 0]).reshape(BLOCK, HEAD_DIM)


@triton.jit
def online_update(acc, m_i, l_i, s, v, qk_scale, PRECISION: tl.constexpr):
    """One key block of the online softmax from its (masked) scores s = q.k [M, N]; m_i is in base-2
    scaled units. The scale (> 0, checked) is applied in the exponent: one FMA per score."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_contiguous(acc, m_i, l_i, q, k_desc, v_desc, kv_bh, n_keys, qk_scale, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Keys 0..n_keys of a [B*kv_heads, n, D] descriptor, all admitted: whole blocks unmasked, then
    the partial last block with the keys past n_keys masked."""
    n_whole = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_whole, BLOCK_N):
        k = load_block(k_desc, kv_bh, start, BLOCK_N, HEAD_DIM)
        v = load_block(v_desc, kv_bh, start, BLOCK_N, HEAD_DIM)
        acc, m_i, l_i = online_update(acc, m_i, l_i, tl.dot(q, tl.trans(k), input_precision=PRECISION), v,
                                      qk_scale, PRECISION)
    if n_whole < n_keys:
        k = load_block(k_desc, kv_bh, n_whole, BLOCK_N, HEAD_DIM)
        v = load_block(v_desc, kv_bh, n_whole, BLOCK_N, HEAD_DIM)
        s = tl.where(((n_whole + tl.arange(0, BLOCK_N)) < n_keys)[None, :],
                     tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, qk_scale, PRECISION)
    return acc, m_i, l_i


@jit
def forward_kernel(q_txt, q_img, k_seq, v_seq, k_img, v_img, k_ext, v_ext, o_txt, o_img, Lse, heads, group,
                   n_tokens, n_text, grid_h, grid_w, n_extra, tiles_x, n_text_blocks, n_image_tiles, n_heads,
                   reach_y, reach_x, max_d2, qk_scale, HEAD_DIM: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                   KY: tl.constexpr, KX: tl.constexpr, CIRCLE: tl.constexpr, PRECISION: tl.constexpr):
    BLOCK_M: tl.constexpr = TY * TX
    BLOCK_N: tl.constexpr = KY * KX
    tile, bh = program_block(n_text_blocks, n_image_tiles, 0, n_heads)
    kv_bh = kv_head(bh, heads, group)
    offs_m = tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked block gives p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if tile < n_text_blocks:  # text queries see every key
        row0 = tile * BLOCK_M
        q = load_block(q_txt, bh, row0, BLOCK_M, HEAD_DIM)
        acc, m_i, l_i = attend_contiguous(acc, m_i, l_i, q, k_seq, v_seq, kv_bh, n_tokens, qk_scale, BLOCK_N,
                                          HEAD_DIM, PRECISION)
        out = acc / l_i[:, None]
        o_txt.store([bh, row0, 0], out.to(q.dtype).reshape(1, BLOCK_M, HEAD_DIM))  # clipped at n_text
        rows = row0 + offs_m
        row_ok = rows < n_text
    else:
        qy0, qx0, qy, qx = image_tile(tile - n_text_blocks, tiles_x, TY, TX)
        q = load_tile(q_img, bh, qy0, qx0, TY, TX, HEAD_DIM)
        acc, m_i, l_i = attend_contiguous(acc, m_i, l_i, q, k_seq, v_seq, kv_bh, n_text, qk_scale, BLOCK_N,
                                          HEAD_DIM, PRECISION)
        qy1, qx1, ky0, kx0, kx_end, n_key_tiles = walk_start(qy0, qx0, grid_h, grid_w, reach_y, reach_x, max_d2,
                                                             TY, TX, KY, KX, CIRCLE)
        for _ in range(n_key_tiles):
            k, v, full = load_key_tile(k_img, v_img, kv_bh, qy0, qy1, qx0, qx1, ky0, kx0, grid_h, grid_w, reach_y,
                                       reach_x, max_d2, KY, KX, HEAD_DIM, CIRCLE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if not full:  # the element mask only on tiles the pattern or the grid border cuts
                s = tl.where(image_mask(qy, qx, ky0, kx0, grid_h, grid_w, reach_y, reach_x, max_d2, KY, KX, CIRCLE),
                             s, float("-inf"))
            acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, qk_scale, PRECISION)
            ky0, kx0, kx_end = walk_next(ky0, kx0, kx_end, qy0, qy1, qx0, qx1, grid_h, grid_w, reach_x, max_d2,
                                         KY, KX, CIRCLE)
        if k_ext is not None:  # extra tokens (None when absent: no descriptors built for them)
            acc, m_i, l_i = attend_contiguous(acc, m_i, l_i, q, k_ext, v_ext, kv_bh, n_extra, qk_scale, BLOCK_N,
                                              HEAD_DIM, PRECISION)
        out = acc / l_i[:, None]
        o_img.store([bh, qy0, qx0, 0], out.to(q.dtype).reshape(1, TY, TX, HEAD_DIM))  # clipped at the grid
        rows = n_text + qy * grid_w + qx
        row_ok = (qy < grid_h) & (qx < grid_w)
    lse = (m_i + tl.log2(l_i)) / LN2_INV  # natural log
    tl.store(Lse + bh.to(tl.int64) * n_tokens + rows, lse, mask=row_ok)


@jit
def delta_kernel(O, dO, Delta, n_rows, head_dim, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PADDED: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, over the flattened [B*heads*N] rows of head_dim columns;
    HEAD_DIM is head_dim rounded up to a power of two (PADDED when they differ; otherwise the row
    stride is a compile-time constant and the loads stay vectorised)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_rows
    if PADDED:
        ok = row_ok[:, None] & (cols < head_dim)[None, :]
        ptrs = rows[:, None] * head_dim + cols[None, :]
    else:
        ok = row_ok[:, None]
        ptrs = rows[:, None] * HEAD_DIM + cols[None, :]
    o = tl.load(O + ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dO + ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def kv_grad_update(dk, dv, p_t, v, q, do, delta, PRECISION: tl.constexpr):
    """dK/dV contributions of one query block from its probabilities p_t [keys, queries]."""
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return dk + tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION), dv


@triton.jit
def row_stats(Lse, Delta, bh, n_tokens, rows, row_ok):
    """Base-2 lse (+inf on rows outside the sequence, so that p = 0 there) and delta of rows."""
    offset = bh.to(tl.int64) * n_tokens
    lse2 = tl.load(Lse + offset + rows, mask=row_ok, other=float("inf")) * LN2_INV
    return lse2, tl.load(Delta + offset + rows, mask=row_ok, other=0.0)


@triton.jit
def kv_grad_contiguous(dk, dv, k, v, q_seq, do_seq, Lse, Delta, bh, n_tokens, row_start, row_end, qk_scale,
                       BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Contributions of the contiguous query rows row_start..row_end, all admitting the key block."""
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + offs_m
        lse2, delta = row_stats(Lse, Delta, bh, n_tokens, rows, rows < row_end)
        q = load_block(q_seq, bh, start, BLOCK_M, HEAD_DIM)
        do = load_block(do_seq, bh, start, BLOCK_M, HEAD_DIM)
        # query rows outside the range carry lse2 = +inf: p = 0 there
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        dk, dv = kv_grad_update(dk, dv, p_t, v, q, do, delta, PRECISION)
    return dk, dv


@jit
def kv_grad_kernel(q_seq, do_seq, q_img, do_img, k_txt, v_txt, k_img, v_img, k_ext, v_ext, dk_txt, dv_txt,
                   dk_img, dv_img, dk_ext, dv_ext, Lse, Delta, heads, group, n_tokens, n_text, grid_h, grid_w,
                   n_extra, tiles_x, n_text_blocks, n_image_tiles, n_extra_blocks, n_heads, reach_y, reach_x, max_d2,
                   qk_scale, scale, HEAD_DIM: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, KY: tl.constexpr,
                   KX: tl.constexpr, CIRCLE: tl.constexpr, PRECISION: tl.constexpr):
    """One program per key block and (batch, kv head): text key blocks, 2-D image key tiles and
    extra key blocks; sums over the query heads of the kv head's group."""
    BLOCK_M: tl.constexpr = TY * TX
    BLOCK_N: tl.constexpr = KY * KX
    tile, kv_bh = program_block(n_text_blocks, n_image_tiles, n_extra_blocks, n_heads)
    kv_heads = heads // group
    first_bh = (kv_bh // kv_heads) * heads + (kv_bh % kv_heads) * group
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if tile < n_text_blocks:  # text keys: every query row admits them
        col0 = tile * BLOCK_N
        k = load_block(k_txt, kv_bh, col0, BLOCK_N, HEAD_DIM)
        v = load_block(v_txt, kv_bh, col0, BLOCK_N, HEAD_DIM)
        for g in range(group):
            dk, dv = kv_grad_contiguous(dk, dv, k, v, q_seq, do_seq, Lse, Delta, first_bh + g, n_tokens, 0,
                                        n_tokens, qk_scale, BLOCK_M, HEAD_DIM, PRECISION)
        dk_txt.store([kv_bh, col0, 0], (dk * scale).to(k.dtype).reshape(1, BLOCK_N, HEAD_DIM))  # clipped at n_text
        dv_txt.store([kv_bh, col0, 0], dv.to(k.dtype).reshape(1, BLOCK_N, HEAD_DIM))
    elif tile < n_text_blocks + n_image_tiles:
        ky0, kx0, ky, kx = image_tile(tile - n_text_blocks, tiles_x, KY, KX)
        k = load_tile(k_img, kv_bh, ky0, kx0, KY, KX, HEAD_DIM)
        v = load_tile(v_img, kv_bh, ky0, kx0, KY, KX, HEAD_DIM)
        ky1, kx1, qy_first, qx_first, qx_end_first, n_query_tiles = walk_start(
            ky0, kx0, grid_h, grid_w, reach_y, reach_x, max_d2, KY, KX, TY, TX, CIRCLE)
        for g in range(group):
            bh = first_bh + g
            # text queries see every image key
            dk, dv = kv_grad_contiguous(dk, dv, k, v, q_seq, do_seq, Lse, Delta, bh, n_tokens, 0, n_text,
                                        qk_scale, BLOCK_M, HEAD_DIM, PRECISION)
            qy0, qx0, qx_end = qy_first, qx_first, qx_end_first
            for _ in range(n_query_tiles):
                qy, qx = tile_positions(qy0, qx0, TY, TX)
                lse2, delta = row_stats(Lse, Delta, bh, n_tokens, n_text + qy * grid_w + qx,
                                        (qy < grid_h) & (qx < grid_w))
                q = load_tile(q_img, bh, qy0, qx0, TY, TX, HEAD_DIM)
                do = load_tile(do_img, bh, qy0, qx0, TY, TX, HEAD_DIM)
                full = tile_inside(ky0, ky1, kx0, kx1, qy0, qy0 + TY - 1, qx0, qx0 + TX - 1, reach_y, reach_x,
                                   max_d2, CIRCLE)
                p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
                if not full:  # out-of-grid keys of a border tile get gradients that are never stored
                    p_t = tl.where(admitted(ky, kx, qy, qx, reach_y, reach_x, max_d2, CIRCLE), p_t, 0.0)
                dk, dv = kv_grad_update(dk, dv, p_t, v, q, do, delta, PRECISION)
                qy0, qx0, qx_end = walk_next(qy0, qx0, qx_end, ky0, ky1, kx0, kx1, grid_h, grid_w, reach_x, max_d2,
                                             TY, TX, CIRCLE)
        dk_img.store([kv_bh, ky0, kx0, 0], (dk * scale).to(k.dtype).reshape(1, KY, KX, HEAD_DIM))
        dv_img.store([kv_bh, ky0, kx0, 0], dv.to(k.dtype).reshape(1, KY, KX, HEAD_DIM))
    elif k_ext is not None:  # extra keys: every image query admits them, text queries do not
        col0 = (tile - n_text_blocks - n_image_tiles) * BLOCK_N
        k = load_block(k_ext, kv_bh, col0, BLOCK_N, HEAD_DIM)
        v = load_block(v_ext, kv_bh, col0, BLOCK_N, HEAD_DIM)
        for g in range(group):
            dk, dv = kv_grad_contiguous(dk, dv, k, v, q_seq, do_seq, Lse, Delta, first_bh + g, n_tokens, n_text,
                                        n_tokens, qk_scale, BLOCK_M, HEAD_DIM, PRECISION)
        dk_ext.store([kv_bh, col0, 0], (dk * scale).to(k.dtype).reshape(1, BLOCK_N, HEAD_DIM))
        dv_ext.store([kv_bh, col0, 0], dv.to(k.dtype).reshape(1, BLOCK_N, HEAD_DIM))


@triton.jit
def q_grad_update(dq, p, do, k, v, delta, PRECISION: tl.constexpr):
    """dQ contribution of one key block from its probabilities p (before the final scale)."""
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def q_grad_contiguous(dq, q, do, lse2, delta, k_desc, v_desc, kv_bh, n_keys, qk_scale, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Keys 0..n_keys, all admitted: whole blocks unmasked, then the partial last block with the keys
    past n_keys masked (the descriptor may go on: image queries read the text keys of the sequence)."""
    n_whole = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_whole, BLOCK_N):
        k = load_block(k_desc, kv_bh, start, BLOCK_N, HEAD_DIM)
        v = load_block(v_desc, kv_bh, start, BLOCK_N, HEAD_DIM)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        dq = q_grad_update(dq, p, do, k, v, delta, PRECISION)
    if n_whole < n_keys:
        k = load_block(k_desc, kv_bh, n_whole, BLOCK_N, HEAD_DIM)
        v = load_block(v_desc, kv_bh, n_whole, BLOCK_N, HEAD_DIM)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        p = tl.where(((n_whole + tl.arange(0, BLOCK_N)) < n_keys)[None, :], p, 0.0)
        dq = q_grad_update(dq, p, do, k, v, delta, PRECISION)
    return dq


@jit
def q_grad_kernel(q_txt, do_txt, q_img, do_img, k_seq, v_seq, k_img, v_img, k_ext, v_ext, dq_txt, dq_img, Lse, Delta,
                  heads, group, n_tokens, n_text, grid_h, grid_w, n_extra, tiles_x, n_text_blocks, n_image_tiles,
                  n_heads, reach_y, reach_x, max_d2, qk_scale, scale, HEAD_DIM: tl.constexpr, TY: tl.constexpr,
                  TX: tl.constexpr, KY: tl.constexpr, KX: tl.constexpr, CIRCLE: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One program per query tile (as the forward) and (batch, head)."""
    BLOCK_M: tl.constexpr = TY * TX
    BLOCK_N: tl.constexpr = KY * KX
    tile, bh = program_block(n_text_blocks, n_image_tiles, 0, n_heads)
    kv_bh = kv_head(bh, heads, group)
    offs_m = tl.arange(0, BLOCK_M)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if tile < n_text_blocks:
        row0 = tile * BLOCK_M
        rows = row0 + offs_m
        lse2, delta = row_stats(Lse, Delta, bh, n_tokens, rows, rows < n_text)
        q = load_block(q_txt, bh, row0, BLOCK_M, HEAD_DIM)
        do = load_block(do_txt, bh, row0, BLOCK_M, HEAD_DIM)
        dq = q_grad_contiguous(dq, q, do, lse2, delta, k_seq, v_seq, kv_bh, n_tokens, qk_scale, BLOCK_N, HEAD_DIM,
                               PRECISION)
        dq_txt.store([bh, row0, 0], (dq * scale).to(q.dtype).reshape(1, BLOCK_M, HEAD_DIM))  # clipped at n_text
    else:
        qy0, qx0, qy, qx = image_tile(tile - n_text_blocks, tiles_x, TY, TX)
        lse2, delta = row_stats(Lse, Delta, bh, n_tokens, n_text + qy * grid_w + qx, (qy < grid_h) & (qx < grid_w))
        q = load_tile(q_img, bh, qy0, qx0, TY, TX, HEAD_DIM)
        do = load_tile(do_img, bh, qy0, qx0, TY, TX, HEAD_DIM)
        dq = q_grad_contiguous(dq, q, do, lse2, delta, k_seq, v_seq, kv_bh, n_text, qk_scale, BLOCK_N, HEAD_DIM,
                               PRECISION)
        qy1, qx1, ky0, kx0, kx_end, n_key_tiles = walk_start(qy0, qx0, grid_h, grid_w, reach_y, reach_x, max_d2,
                                                             TY, TX, KY, KX, CIRCLE)
        for _ in range(n_key_tiles):
            k, v, full = load_key_tile(k_img, v_img, kv_bh, qy0, qy1, qx0, qx1, ky0, kx0, grid_h, grid_w, reach_y,
                                       reach_x, max_d2, KY, KX, HEAD_DIM, CIRCLE)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
            if not full:
                p = tl.where(image_mask(qy, qx, ky0, kx0, grid_h, grid_w, reach_y, reach_x, max_d2, KY, KX, CIRCLE),
                             p, 0.0)
            dq = q_grad_update(dq, p, do, k, v, delta, PRECISION)
            ky0, kx0, kx_end = walk_next(ky0, kx0, kx_end, qy0, qy1, qx0, qx1, grid_h, grid_w, reach_x, max_d2,
                                         KY, KX, CIRCLE)
        if k_ext is not None:
            dq = q_grad_contiguous(dq, q, do, lse2, delta, k_ext, v_ext, kv_bh, n_extra, qk_scale, BLOCK_N, HEAD_DIM,
                                   PRECISION)
        dq_img.store([bh, qy0, qx0, 0], (dq * scale).to(q.dtype).reshape(1, TY, TX, HEAD_DIM))  # clipped at the grid
