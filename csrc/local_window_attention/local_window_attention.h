// Local-window (CLEAR) attention: torch-free parameters and window geometry.
//
// Sequence: [n_text text tokens | grid_h * grid_w image tokens, raster order] (N tokens), and for
// keys/values optionally E extra tokens after it. A text query attends all N sequence keys; an
// image query at (y, x) attends all text keys, all extra keys, and the image key at (y', x') iff
// (y-y')^2 + (x-x')^2 < radius^2 (circle) or |y-y'| <= window_h and |x-x'| <= window_w
// (rectangle). Within one grid row the admitted keys are one contiguous span, so kernels walk
// rows and spans instead of testing keys. Over the N sequence tokens the relation is symmetric:
// the queries that attend key j are exactly the keys that query j attends, which lets the
// backward accumulate dK/dV per key (deterministically, without atomics).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fewstep/dtype.h"

namespace fewstep {
namespace local_window_attention {

// Tensors are contiguous: q, out, grad_out, dq [B, heads, N, D]; k, v, dk, dv [B, kv_heads, N, D];
// extra_k, extra_v, dextra_k, dextra_v [B, kv_heads, E, D]; lse, delta [B, heads, N]. Pointers a
// direction does not use are null.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* extra_k;  // null when E == 0
  const void* extra_v;
  void* out;        // written by the forward, read by the backward
  void* lse;        // fp32, fp64 for fp64 inputs; written by the forward, read by the backward
  const void* grad_out;
  void* dq;
  void* dk;
  void* dv;
  void* dextra_k;
  void* dextra_v;
  void* delta;      // backward scratch: rowsum(grad_out * out), dtype of lse
  DType dtype;      // of every tensor but lse/delta
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

// Calls f(first, last) for every contiguous range of sequence keys (indices in [0, N)) that
// sequence query i attends, in increasing order. Extra keys are the caller's: image queries
// (i >= n_text) attend all of them. By symmetry, f also receives the queries that attend key i.
template <class F>
inline void for_each_key_range(const Params& p, const std::vector<int64_t>& half_width, int64_t i, F&& f) {
  if (i < p.n_text) {
    f(int64_t{0}, p.seq_len);
    return;
  }
  if (p.n_text > 0) f(int64_t{0}, p.n_text);
  const int64_t pos = i - p.n_text, y = pos / p.grid_w, x = pos % p.grid_w;
  const int64_t reach = static_cast<int64_t>(half_width.size()) - 1;
  for (int64_t yk = std::max<int64_t>(0, y - reach); yk <= std::min(p.grid_h - 1, y + reach); ++yk) {
    const int64_t m = half_width[yk > y ? yk - y : y - yk];
    const int64_t row = p.n_text + yk * p.grid_w;
    f(row + std::max<int64_t>(0, x - m), row + std::min(p.grid_w - 1, x + m) + 1);
  }
}

}  // namespace local_window_attention
}  // namespace fewstep
