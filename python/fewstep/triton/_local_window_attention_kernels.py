"""The @triton.jit kernels of local-window attention (imported on first launch, so that fewstep
imports without Triton); launched from :mod:`fewstep.triton.local_window_attention`, whose
docstring and docs/attention.md describe the design."""
from __future__ import annotations

import functools

import triton
import triton.language as tl

# Runtime integer arguments that must not be specialised (Triton otherwise compiles separate
# variants for values equal to 1 or divisible by 16): the pattern and the sizes.
RUNTIME_INTS = ["heads", "group", "n_tokens", "n_text", "grid_h", "grid_w", "n_extra", "tiles_x",
                "n_text_blocks", "n_image_tiles", "reach_y", "reach_x", "max_d2", "n_rows"]
jit = functools.partial(triton.jit, do_not_specialize=RUNTIME_INTS)


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
def tile_inside(qy0, qy1, qx0, qx1, ky0, ky1, kx0, kx1, reach_y, reach_x, max_d2, CIRCLE: tl.constexpr):
    """Whether every query of [qy0, qy1] x [qx0, qx1] admits every key of [ky0, ky1] x [kx0, kx1]."""
    far_y = tl.maximum(ky1 - qy0, qy1 - ky0)
    far_x = tl.maximum(kx1 - qx0, qx1 - kx0)
    if CIRCLE:
        return far_y * far_y + far_x * far_x <= max_d2
    else:
        return (far_y <= reach_y) & (far_x <= reach_x)


@triton.jit
def load_rows(base, rows, ok, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """[len(rows), HEAD_DIM] of a row-major block; the pointers are built here, at the load, so
    that only the 1-D row index stays live in registers across a loop body."""
    ptrs = base + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def online_step(acc, m_i, l_i, q, k_base, v_base, cols, key_ok, allowed, qk_scale, HEAD_DIM: tl.constexpr,
                MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (base-2 exponent); ``allowed`` [M, N] when MASKED."""
    k = load_rows(k_base, cols, key_ok, HEAD_DIM, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(v_base, cols, key_ok, HEAD_DIM, MASKED)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def attend_contiguous(acc, m_i, l_i, q, k_base, v_base, n_keys, qk_scale, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Keys 0..n_keys of a contiguous [n, HEAD_DIM] block, all admitted."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        key_ok = cols < n_keys
        acc, m_i, l_i = online_step(acc, m_i, l_i, q, k_base, v_base, cols, key_ok, key_ok[None, :], qk_scale,
                                    HEAD_DIM, True, PRECISION)
    return acc, m_i, l_i


@jit
def forward_kernel(Q, K, V, EK, EV, Out, Lse, heads, group, n_tokens, n_text, grid_h, grid_w, n_extra,
                   tiles_x, n_text_blocks, reach_y, reach_x, max_d2, qk_scale,
                   HEAD_DIM: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, KY: tl.constexpr,
                   KX: tl.constexpr, CIRCLE: tl.constexpr, HAS_TEXT: tl.constexpr,
                   HAS_EXTRA: tl.constexpr, PRECISION: tl.constexpr):
    BLOCK_M: tl.constexpr = TY * TX
    BLOCK_N: tl.constexpr = KY * KX
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    kv_bh = (bh // heads) * (heads // group) + (bh % heads) // group
    q_base = Q + bh.to(tl.int64) * n_tokens * HEAD_DIM
    k_base = K + kv_bh.to(tl.int64) * n_tokens * HEAD_DIM
    v_base = V + kv_bh.to(tl.int64) * n_tokens * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked block gives p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if tile < n_text_blocks:  # text queries (first: they are the longest programs) see every key
        rows = tile * BLOCK_M + offs_m
        row_ok = rows < n_text
        q = load_rows(q_base, rows, row_ok, HEAD_DIM, True)
        acc, m_i, l_i = attend_contiguous(acc, m_i, l_i, q, k_base, v_base, n_tokens, qk_scale, BLOCK_N,
                                          HEAD_DIM, PRECISION)
    else:
        image_tile = tile - n_text_blocks
        qy0 = (image_tile // tiles_x) * TY
        qx0 = (image_tile % tiles_x) * TX
        qy = qy0 + offs_m // TX
        qx = qx0 + offs_m % TX
        row_ok = (qy < grid_h) & (qx < grid_w)
        rows = n_text + qy * grid_w + qx
        q = load_rows(q_base, rows, row_ok, HEAD_DIM, True)
        if HAS_TEXT:
            acc, m_i, l_i = attend_contiguous(acc, m_i, l_i, q, k_base, v_base, n_text, qk_scale, BLOCK_N,
                                              HEAD_DIM, PRECISION)
        qy1 = tl.minimum(qy0 + TY, grid_h) - 1
        qx1 = tl.minimum(qx0 + TX, grid_w) - 1
        for ky0 in range(tl.maximum(qy0 - reach_y, 0), tl.minimum(qy1 + reach_y + 1, grid_h), KY):
            ky1 = tl.minimum(ky0 + KY, grid_h) - 1
            gap_y = tl.maximum(tl.maximum(ky0 - qy1, qy0 - ky1), 0)
            dx_reach = x_reach(gap_y, reach_x, max_d2, CIRCLE)
            ky = ky0 + offs_n // KX
            for kx0 in range(tl.maximum(qx0 - dx_reach, 0), tl.minimum(qx1 + dx_reach + 1, grid_w), KX):
                kx = kx0 + offs_n % KX
                cols = n_text + ky * grid_w + kx
                inside = tile_inside(qy0, qy1, qx0, qx1, ky0, ky0 + KY - 1, kx0, kx0 + KX - 1, reach_y,
                                     reach_x, max_d2, CIRCLE)
                if inside & (ky0 + KY <= grid_h) & (kx0 + KX <= grid_w):
                    acc, m_i, l_i = online_step(acc, m_i, l_i, q, k_base, v_base, cols, cols < 0, cols[None, :] < 0,
                                                qk_scale, HEAD_DIM, False, PRECISION)
                else:
                    key_ok = (ky < grid_h) & (kx < grid_w)
                    allowed = admitted(qy, qx, ky, kx, reach_y, reach_x, max_d2, CIRCLE) & key_ok[None, :]
                    acc, m_i, l_i = online_step(acc, m_i, l_i, q, k_base, v_base, cols, key_ok, allowed, qk_scale,
                                                HEAD_DIM, True, PRECISION)
        if HAS_EXTRA:
            e_off = kv_bh.to(tl.int64) * n_extra * HEAD_DIM
            acc, m_i, l_i = attend_contiguous(acc, m_i, l_i, q, EK + e_off, EV + e_off, n_extra, qk_scale,
                                              BLOCK_N, HEAD_DIM, PRECISION)
    out = acc / l_i[:, None]
    tl.store(Out + bh.to(tl.int64) * n_tokens * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log
    tl.store(Lse + bh.to(tl.int64) * n_tokens + rows, lse, mask=row_ok)


@jit
def delta_kernel(O, dO, Delta, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, over the flattened [B*heads*N] rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    ptrs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(dO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def kv_grad_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rows, row_ok, allowed, qk_scale,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dK/dV contributions of one query block (rows) to a key block, in transposed form [keys, queries]."""
    q = load_rows(q_base, rows, row_ok, HEAD_DIM, True)
    do = load_rows(do_base, rows, row_ok, HEAD_DIM, True)
    lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED:
        p_t = tl.where(allowed, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def kv_grad_contiguous(dk, dv, k, v, q_base, do_base, lse_base, delta_base, row_start, row_end, qk_scale,
                       BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Contributions of the contiguous query rows row_start..row_end, all admitting the key block."""
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < row_end
        dk, dv = kv_grad_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rows, row_ok,
                              row_ok[None, :], qk_scale, HEAD_DIM, False, PRECISION)
    return dk, dv


@jit
def kv_grad_kernel(Q, K, V, EK, EV, dO, Lse, Delta, dK, dV, dEK, dEV, heads, group, n_tokens, n_text,
                   grid_h, grid_w, n_extra, tiles_x, n_text_blocks, n_image_tiles, reach_y, reach_x, max_d2,
                   qk_scale, scale, HEAD_DIM: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr,
                   KY: tl.constexpr, KX: tl.constexpr, CIRCLE: tl.constexpr, HAS_TEXT: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One program per key block and (batch, kv head): text key blocks, then 2-D image key
    tiles, then extra key blocks; sums over the query heads of the kv head's group."""
    BLOCK_M: tl.constexpr = TY * TX
    BLOCK_N: tl.constexpr = KY * KX
    tile = tl.program_id(0)
    kv_bh = tl.program_id(1)
    kv_heads = heads // group
    b = kv_bh // kv_heads
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    kv_off = kv_bh.to(tl.int64) * n_tokens * HEAD_DIM
    if tile < n_text_blocks:  # text keys: every query row admits them
        cols = tile * BLOCK_N + offs_n
        col_ok = cols < n_text
        k = load_rows(K + kv_off, cols, col_ok, HEAD_DIM, True)
        v = load_rows(V + kv_off, cols, col_ok, HEAD_DIM, True)
        for g in range(group):
            bh = (b * heads + (kv_bh % kv_heads) * group + g).to(tl.int64)
            dk, dv = kv_grad_contiguous(dk, dv, k, v, Q + bh * n_tokens * HEAD_DIM,
                                        dO + bh * n_tokens * HEAD_DIM, Lse + bh * n_tokens,
                                        Delta + bh * n_tokens, 0, n_tokens, qk_scale, BLOCK_M, HEAD_DIM,
                                        PRECISION)
        dk_base = dK + kv_off
        dv_base = dV + kv_off
    elif tile < n_text_blocks + n_image_tiles:
        image_tile = tile - n_text_blocks
        ky0 = (image_tile // tiles_x) * KY
        kx0 = (image_tile % tiles_x) * KX
        ky = ky0 + offs_n // KX
        kx = kx0 + offs_n % KX
        col_ok = (ky < grid_h) & (kx < grid_w)
        cols = n_text + ky * grid_w + kx
        k = load_rows(K + kv_off, cols, col_ok, HEAD_DIM, True)
        v = load_rows(V + kv_off, cols, col_ok, HEAD_DIM, True)
        ky1 = tl.minimum(ky0 + KY, grid_h) - 1
        kx1 = tl.minimum(kx0 + KX, grid_w) - 1
        for g in range(group):
            bh = (b * heads + (kv_bh % kv_heads) * group + g).to(tl.int64)
            q_base = Q + bh * n_tokens * HEAD_DIM
            do_base = dO + bh * n_tokens * HEAD_DIM
            lse_base = Lse + bh * n_tokens
            delta_base = Delta + bh * n_tokens
            if HAS_TEXT:  # text queries see every image key
                dk, dv = kv_grad_contiguous(dk, dv, k, v, q_base, do_base, lse_base, delta_base, 0, n_text,
                                            qk_scale, BLOCK_M, HEAD_DIM, PRECISION)
            for qy0 in range(tl.maximum(ky0 - reach_y, 0), tl.minimum(ky1 + reach_y + 1, grid_h), TY):
                qy1 = tl.minimum(qy0 + TY, grid_h) - 1
                gap_y = tl.maximum(tl.maximum(qy0 - ky1, ky0 - qy1), 0)
                dx_reach = x_reach(gap_y, reach_x, max_d2, CIRCLE)
                qy = qy0 + offs_m // TX
                for qx0 in range(tl.maximum(kx0 - dx_reach, 0), tl.minimum(kx1 + dx_reach + 1, grid_w), TX):
                    qx = qx0 + offs_m % TX
                    row_ok = (qy < grid_h) & (qx < grid_w)
                    rows = n_text + qy * grid_w + qx
                    inside = tile_inside(qy0, qy0 + TY - 1, qx0, qx0 + TX - 1, ky0, ky1, kx0, kx1, reach_y,
                                         reach_x, max_d2, CIRCLE)
                    # out-of-grid keys of a border tile get gradients that are never stored
                    if inside:
                        dk, dv = kv_grad_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rows,
                                              row_ok, row_ok[None, :], qk_scale, HEAD_DIM, False, PRECISION)
                    else:
                        allowed = admitted(ky, kx, qy, qx, reach_y, reach_x, max_d2, CIRCLE)
                        dk, dv = kv_grad_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rows,
                                              row_ok, allowed, qk_scale, HEAD_DIM, True, PRECISION)
        dk_base = dK + kv_off
        dv_base = dV + kv_off
    else:  # extra keys: every image query admits them, text queries do not
        cols = (tile - n_text_blocks - n_image_tiles) * BLOCK_N + offs_n
        col_ok = cols < n_extra
        e_off = kv_bh.to(tl.int64) * n_extra * HEAD_DIM
        k = load_rows(EK + e_off, cols, col_ok, HEAD_DIM, True)
        v = load_rows(EV + e_off, cols, col_ok, HEAD_DIM, True)
        for g in range(group):
            bh = (b * heads + (kv_bh % kv_heads) * group + g).to(tl.int64)
            dk, dv = kv_grad_contiguous(dk, dv, k, v, Q + bh * n_tokens * HEAD_DIM,
                                        dO + bh * n_tokens * HEAD_DIM, Lse + bh * n_tokens,
                                        Delta + bh * n_tokens, n_text, n_tokens, qk_scale, BLOCK_M, HEAD_DIM,
                                        PRECISION)
        dk_base = dEK + e_off
        dv_base = dEV + e_off
    out_ptrs = cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_base + out_ptrs, (dk * scale).to(dK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_base + out_ptrs, dv.to(dV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def q_grad_step(dq, q, do, lse2, delta, k_base, v_base, cols, key_ok, allowed, qk_scale, HEAD_DIM: tl.constexpr,
                MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dQ contribution of one key block (before the final multiplication by scale)."""
    k = load_rows(k_base, cols, key_ok, HEAD_DIM, MASKED)
    v = load_rows(v_base, cols, key_ok, HEAD_DIM, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def q_grad_contiguous(dq, q, do, lse2, delta, k_base, v_base, n_keys, qk_scale, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        key_ok = cols < n_keys
        dq = q_grad_step(dq, q, do, lse2, delta, k_base, v_base, cols, key_ok, key_ok[None, :], qk_scale,
                         HEAD_DIM, True, PRECISION)
    return dq


@jit
def q_grad_kernel(Q, K, V, EK, EV, dO, Lse, Delta, dQ, heads, group, n_tokens, n_text, grid_h, grid_w,
                  n_extra, tiles_x, n_text_blocks, reach_y, reach_x, max_d2, qk_scale, scale,
                  HEAD_DIM: tl.constexpr, TY: tl.constexpr, TX: tl.constexpr, KY: tl.constexpr,
                  KX: tl.constexpr, CIRCLE: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_EXTRA: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One program per query tile (as the forward) and (batch, head)."""
    BLOCK_M: tl.constexpr = TY * TX
    BLOCK_N: tl.constexpr = KY * KX
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    kv_bh = (bh // heads) * (heads // group) + (bh % heads) // group
    q_off = bh.to(tl.int64) * n_tokens * HEAD_DIM
    k_base = K + kv_bh.to(tl.int64) * n_tokens * HEAD_DIM
    v_base = V + kv_bh.to(tl.int64) * n_tokens * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    image_tile = tl.maximum(tile - n_text_blocks, 0)  # grid coordinates, used by image programs only
    qy0 = (image_tile // tiles_x) * TY
    qx0 = (image_tile % tiles_x) * TX
    qy = qy0 + offs_m // TX
    qx = qx0 + offs_m % TX
    if tile < n_text_blocks:
        rows = tile * BLOCK_M + offs_m
        row_ok = rows < n_text
    else:
        row_ok = (qy < grid_h) & (qx < grid_w)
        rows = n_text + qy * grid_w + qx
    q = load_rows(Q + q_off, rows, row_ok, HEAD_DIM, True)
    do = load_rows(dO + q_off, rows, row_ok, HEAD_DIM, True)
    lse2 = tl.load(Lse + bh.to(tl.int64) * n_tokens + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * n_tokens + rows, mask=row_ok, other=0.0)
    if tile < n_text_blocks:
        dq = q_grad_contiguous(dq, q, do, lse2, delta, k_base, v_base, n_tokens, qk_scale, BLOCK_N, HEAD_DIM,
                               PRECISION)
    else:
        if HAS_TEXT:
            dq = q_grad_contiguous(dq, q, do, lse2, delta, k_base, v_base, n_text, qk_scale, BLOCK_N,
                                   HEAD_DIM, PRECISION)
        qy1 = tl.minimum(qy0 + TY, grid_h) - 1
        qx1 = tl.minimum(qx0 + TX, grid_w) - 1
        for ky0 in range(tl.maximum(qy0 - reach_y, 0), tl.minimum(qy1 + reach_y + 1, grid_h), KY):
            ky1 = tl.minimum(ky0 + KY, grid_h) - 1
            gap_y = tl.maximum(tl.maximum(ky0 - qy1, qy0 - ky1), 0)
            dx_reach = x_reach(gap_y, reach_x, max_d2, CIRCLE)
            ky = ky0 + offs_n // KX
            for kx0 in range(tl.maximum(qx0 - dx_reach, 0), tl.minimum(qx1 + dx_reach + 1, grid_w), KX):
                kx = kx0 + offs_n % KX
                cols = n_text + ky * grid_w + kx
                inside = tile_inside(qy0, qy1, qx0, qx1, ky0, ky0 + KY - 1, kx0, kx0 + KX - 1, reach_y,
                                     reach_x, max_d2, CIRCLE)
                if inside & (ky0 + KY <= grid_h) & (kx0 + KX <= grid_w):
                    dq = q_grad_step(dq, q, do, lse2, delta, k_base, v_base, cols, cols < 0, cols[None, :] < 0,
                                     qk_scale, HEAD_DIM, False, PRECISION)
                else:
                    key_ok = (ky < grid_h) & (kx < grid_w)
                    allowed = admitted(qy, qx, ky, kx, reach_y, reach_x, max_d2, CIRCLE) & key_ok[None, :]
                    dq = q_grad_step(dq, q, do, lse2, delta, k_base, v_base, cols, key_ok, allowed, qk_scale,
                                     HEAD_DIM, True, PRECISION)
        if HAS_EXTRA:
            e_off = kv_bh.to(tl.int64) * n_extra * HEAD_DIM
            dq = q_grad_contiguous(dq, q, do, lse2, delta, EK + e_off, EV + e_off, n_extra, qk_scale, BLOCK_N,
                                   HEAD_DIM, PRECISION)
    tl.store(dQ + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])
