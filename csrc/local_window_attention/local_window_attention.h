// Local-window (CLEAR) attention: torch-free parameters and window geometry.
//
// Sequence: [n_text text tokens | grid_h * grid_w image tokens, raster order] (N tokens), and for
// keys/values optionally E extra tokens after it. A text query attends all N sequence keys; an
// image query at (y, x) attends all text keys, all extra keys, and the image key at (y', x') iff
// (y-y')^2 + (x-x')^2 < radius^2 (circle) or |y-y'| <= window_h and |x-x'| <= window_w
// (rectangle). Within one grid row the admitted keys are one contiguous span, so kernels walk
// rows and spans instead of testing keys. Over the N sequence tokens the relation is symmetric:
// the queries that attend key j are exactly the keys that query j attends, which lets the
// backward accumulate dK/dV per key (deterministically, without atomics) with the same spans.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fewstep/dtype.h"

namespace fewstep {
namespace local_window_attention {

// Tensors are contiguous: q, out, grad_out, dq [B, heads, N, D]; k, v, dk, dv [B, kv_heads, N, D];
// extra_k, extra_v, dextra_k, dextra_v [B, kv_heads, E, D]; lse [B, heads, N]; dk_parts, dv_parts
// [B * kv_heads * (backward_chunks - 1), N + E, D]. Pointers a direction does not use are null.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* extra_k;  // null when E == 0
  const void* extra_v;
  void* out;        // written by the forward, read by the backward
  void* lse;        // fp32, fp64 for fp64 inputs; written by the forward
  const void* grad_out;
  void* dq;
  void* dk;
  void* dv;
  void* dextra_k;
  void* dextra_v;
  // The CPU backward splits each kv head's query blocks into backward_chunks chunks; chunk 0 adds
  // its share of dK and dV into the outputs and each later one into its own slot of these.
  int64_t backward_chunks;
  void* dk_parts;
  void* dv_parts;
  DType dtype;      // of every tensor but lse (the CPU glue passes fp16/bf16 as fp32)
  int64_t batch, heads, kv_heads, seq_len, n_extra, head_dim;
  int64_t grid_h, grid_w, n_text;
  double radius;    // > 0: circle (window_h == window_w == -1)
  int64_t window_h, window_w;  // >= 0: rectangle (radius == 0)
  double scale;
};

// Admitted column half-width for each row distance |y - y'|: half_width[dy] = m >= 0 means
// columns |x - x'| <= m are admitted; rows with dy >= half_width.size() admit nothing.
inline std::vector<int64_t> row_half_widths(const Params& p) {
  std::vector<int64_t> half_width;
  if (p.radius > 0) {
    // A radius beyond grid_h + grid_w admits the whole grid; clamping keeps the integer test exact.
    const double r = std::min(p.radius, static_cast<double>(p.grid_h + p.grid_w));
    const double r2 = r * r;
    for (int64_t dy = 0; dy < p.grid_h && static_cast<double>(dy * dy) < r2; ++dy) {
      // largest m with dy^2 + m^2 < r^2 (strict), exactly as the reference compares in fp64
      int64_t m = static_cast<int64_t>(std::sqrt(r2 - static_cast<double>(dy * dy)));
      while (m >= 0 && static_cast<double>(dy * dy + m * m) >= r2) --m;
      while (static_cast<double>(dy * dy + (m + 1) * (m + 1)) < r2) ++m;
      half_width.push_back(std::min(m, p.grid_w - 1));
    }
  } else {
    half_width.assign(std::min(p.window_h + 1, p.grid_h), std::min(p.window_w, p.grid_w - 1));
  }
  return half_width;
}

constexpr int kBlock = 4;  // query rows the CPU kernels handle together

// Up to kBlock consecutive query rows of one kind: text tokens, or image tokens of one grid row.
struct RowBlock {
  int64_t first, count;
};

inline std::vector<RowBlock> query_blocks(const Params& p) {
  std::vector<RowBlock> blocks;
  auto split = [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; r += kBlock) blocks.push_back({r, std::min<int64_t>(kBlock, last - r)});
  };
  split(0, p.n_text);
  for (int64_t y = 0; y < p.grid_h; ++y) split(p.n_text + y * p.grid_w, p.n_text + (y + 1) * p.grid_w);
  return blocks;
}

// A contiguous run of keys that a query block attends: sequence tokens [first, first + count), or
// extra tokens when `extra`. Row t of the block admits the keys [lo[t], hi[t]) of the run (lo == hi
// == 0 for the padding rows t >= block.count).
struct Segment {
  int64_t first, count;
  bool extra;
  int64_t lo[kBlock], hi[kBlock];
};

// The segments of a query block, in a fixed order: text queries see every sequence token, image
// queries the text tokens, the runs of their window on each grid row, and the extra tokens.
inline void block_segments(const Params& p, const std::vector<int64_t>& half_width, const RowBlock& block,
                           std::vector<Segment>& out) {
  out.clear();
  auto add_full = [&](int64_t first, int64_t count, bool extra) {
    Segment s{first, count, extra, {}, {}};
    for (int t = 0; t < block.count; ++t) s.hi[t] = count;
    out.push_back(s);
  };
  if (block.first < p.n_text) {  // text rows: every sequence token
    add_full(0, p.seq_len, false);
    return;
  }
  if (p.n_text > 0) add_full(0, p.n_text, false);
  const int64_t pos = block.first - p.n_text, y = pos / p.grid_w, x0 = pos % p.grid_w;
  const int64_t x_last = x0 + block.count - 1;
  const int64_t reach = static_cast<int64_t>(half_width.size()) - 1;
  for (int64_t yk = std::max<int64_t>(0, y - reach); yk <= std::min(p.grid_h - 1, y + reach); ++yk) {
    const int64_t m = half_width[yk > y ? yk - y : y - yk];
    const int64_t col_first = std::max<int64_t>(0, x0 - m), col_last = std::min(p.grid_w - 1, x_last + m);
    Segment s{p.n_text + yk * p.grid_w + col_first, col_last - col_first + 1, false, {}, {}};
    for (int t = 0; t < block.count; ++t) {
      s.lo[t] = std::max<int64_t>(0, x0 + t - m) - col_first;
      s.hi[t] = std::min(p.grid_w - 1, x0 + t + m) + 1 - col_first;
    }
    out.push_back(s);
  }
  if (p.n_extra > 0) add_full(0, p.n_extra, true);
}

}  // namespace local_window_attention
}  // namespace fewstep
