// Local-window (CLEAR) attention: op schemas, argument checks and the CPU kernels.
//
// Forward, per query: scores of the admitted keys (rows and spans, never all N), then softmax
// and the weighted sum of values; lse = max + log(sum). Backward recomputes P = exp(S - lse):
// a query pass writes dQ and delta = rowsum(dO * O), then a key pass writes dK and dV, each key
// summing over the queries that attend it in a fixed order (no atomics, no partial buffers), so
// results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fewstep/checks.h"
#include "local_window_attention/local_window_attention.h"

namespace fewstep {
namespace local_window_attention {
namespace {

constexpr int64_t kRowBlock = 16;  // queries (forward, dQ) or keys (dK/dV) per parallel task

// Eight independent partial sums so that the compiler vectorizes without reassociating.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * b[d + l];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
void axpy(T* y, T a, const T* x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// Views of one (batch, query head) slice: its kv head, extra tokens and row pointers.
template <typename T>
struct HeadView {
  const T* q;
  const T* k;
  const T* v;
  const T* extra_k;
  const T* extra_v;
  int64_t bh;   // b * heads + h: row of q, out, lse
  int64_t bkv;  // b * kv_heads + h / group: row of k, v, extra
};

template <typename T>
HeadView<T> head_view(const Params& p, int64_t b, int64_t h) {
  const int64_t group = p.heads / p.kv_heads;
  HeadView<T> view;
  view.bh = b * p.heads + h;
  view.bkv = b * p.kv_heads + h / group;
  view.q = static_cast<const T*>(p.q) + view.bh * p.seq_len * p.head_dim;
  view.k = static_cast<const T*>(p.k) + view.bkv * p.seq_len * p.head_dim;
  view.v = static_cast<const T*>(p.v) + view.bkv * p.seq_len * p.head_dim;
  view.extra_k = p.n_extra ? static_cast<const T*>(p.extra_k) + view.bkv * p.n_extra * p.head_dim : nullptr;
  view.extra_v = p.n_extra ? static_cast<const T*>(p.extra_v) + view.bkv * p.n_extra * p.head_dim : nullptr;
  return view;
}

// Calls f(k_j, v_j) for every key/value row that query i attends, in a fixed order.
template <typename T, class F>
void for_each_key(const Params& p, const std::vector<int64_t>& half_width, const HeadView<T>& view, int64_t i,
                  F&& f) {
  const int64_t D = p.head_dim;
  for_each_key_range(p, half_width, i, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) f(view.k + j * D, view.v + j * D);
  });
  if (i >= p.n_text)
    for (int64_t e = 0; e < p.n_extra; ++e) f(view.extra_k + e * D, view.extra_v + e * D);
}

// Runs f(b, h_or_kv, first, last) over blocks of `rows` rows of every (batch, head) pair.
template <class F>
void for_each_row_block(int64_t batch, int64_t heads, int64_t rows, F&& f) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / blocks, block = t % blocks;
      f(bh / heads, bh % heads, block * kRowBlock, std::min(rows, (block + 1) * kRowBlock));
    }
  });
}

template <typename T>
void forward_kernel(const Params& p) {
  const auto half_width = row_half_widths(p);
  const int64_t N = p.seq_len, D = p.head_dim;
  const T scale = static_cast<T>(p.scale);
  T* out = static_cast<T*>(p.out);
  T* lse = static_cast<T*>(p.lse);
  for_each_row_block(p.batch, p.heads, N, [&](int64_t b, int64_t h, int64_t first, int64_t last) {
    const HeadView<T> view = head_view<T>(p, b, h);
    std::vector<T> scores(N + p.n_extra), acc(D);
    for (int64_t i = first; i < last; ++i) {
      const T* qi = view.q + i * D;
      T max_score = -std::numeric_limits<T>::infinity();
      int64_t n = 0;
      for_each_key(p, half_width, view, i, [&](const T* kj, const T*) {
        const T s = scale * dot(qi, kj, D);
        scores[n++] = s;
        max_score = std::max(max_score, s);
      });
      std::fill(acc.begin(), acc.end(), T(0));
      T sum = 0;
      n = 0;
      for_each_key(p, half_width, view, i, [&](const T*, const T* vj) {
        const T w = std::exp(scores[n++] - max_score);
        sum += w;
        axpy(acc.data(), w, vj, D);
      });
      T* oi = out + (view.bh * N + i) * D;
      const T inv = T(1) / sum;
      for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] * inv;
      lse[view.bh * N + i] = max_score + std::log(sum);
    }
  });
}

template <typename T>
void backward_kernel(const Params& p) {
  const auto half_width = row_half_widths(p);
  const int64_t N = p.seq_len, D = p.head_dim, group = p.heads / p.kv_heads;
  const T scale = static_cast<T>(p.scale);
  const T* out = static_cast<const T*>(p.out);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* lse = static_cast<const T*>(p.lse);
  T* delta = static_cast<T*>(p.delta);

  // Query pass: delta_i = dO_i . O_i, dQ_i = scale * sum_j P_ij (dO_i . v_j - delta_i) k_j.
  T* dq = static_cast<T*>(p.dq);
  for_each_row_block(p.batch, p.heads, N, [&](int64_t b, int64_t h, int64_t first, int64_t last) {
    const HeadView<T> view = head_view<T>(p, b, h);
    std::vector<T> acc(D);
    for (int64_t i = first; i < last; ++i) {
      const int64_t row = view.bh * N + i;
      const T* qi = view.q + i * D;
      const T* doi = grad_out + row * D;
      const T delta_i = dot(doi, out + row * D, D);
      delta[row] = delta_i;
      std::fill(acc.begin(), acc.end(), T(0));
      for_each_key(p, half_width, view, i, [&](const T* kj, const T* vj) {
        const T prob = std::exp(scale * dot(qi, kj, D) - lse[row]);
        axpy(acc.data(), prob * (dot(doi, vj, D) - delta_i), kj, D);
      });
      T* dqi = dq + row * D;
      for (int64_t d = 0; d < D; ++d) dqi[d] = scale * acc[d];
    }
  });

  // Key pass over the N sequence keys and then the E extra keys of each kv head: every query
  // head of the group, and in it every query that attends key j (symmetry, or all image queries
  // for an extra key), adds P_ij dO_i to dV_j and scale * dS_ij q_i to dK_j.
  for_each_row_block(p.batch, p.kv_heads, N + p.n_extra, [&](int64_t b, int64_t kvh, int64_t first, int64_t last) {
    std::vector<T> dk_acc(D), dv_acc(D);
    const int64_t bkv = b * p.kv_heads + kvh;
    for (int64_t j = first; j < last; ++j) {
      const bool extra = j >= N;
      const int64_t kv_row = extra ? bkv * p.n_extra + (j - N) : bkv * N + j;
      const T* kj = static_cast<const T*>(extra ? p.extra_k : p.k) + kv_row * D;
      const T* vj = static_cast<const T*>(extra ? p.extra_v : p.v) + kv_row * D;
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const HeadView<T> view = head_view<T>(p, b, h);
        auto add_query = [&](int64_t i) {
          const int64_t row = view.bh * N + i;
          const T* qi = view.q + i * D;
          const T* doi = grad_out + row * D;
          const T prob = std::exp(scale * dot(qi, kj, D) - lse[row]);
          axpy(dv_acc.data(), prob, doi, D);
          axpy(dk_acc.data(), prob * (dot(doi, vj, D) - delta[row]), qi, D);
        };
        auto add_queries = [&](int64_t q_first, int64_t q_last) {
          for (int64_t i = q_first; i < q_last; ++i) add_query(i);
        };
        if (extra) add_queries(p.n_text, N);
        else for_each_key_range(p, half_width, j, add_queries);
      }
      T* dk = static_cast<T*>(extra ? p.dextra_k : p.dk) + kv_row * D;
      T* dv = static_cast<T*>(extra ? p.dextra_v : p.dv) + kv_row * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = scale * dk_acc[d];
        dv[d] = dv_acc[d];
      }
    }
  });
}

// ---- torch glue ----------------------------------------------------------------------------

void check_4d(const at::Tensor& t, const char* name, const char* layout) {
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-D tensor ", layout, ", got shape ", t.sizes());
}

// Dtype and device of `t` against q's.
void check_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", dtype_name(q.scalar_type()),
                   " (the dtype of q), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == q.device(), name, ": expected device ", q.device(), " (the device of q), got ",
                    t.device());
}

// The kernels compute in fp32 (fp64 for fp64): half inputs are converted once here, since every
// key row is read by many queries.
at::ScalarType compute_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct Prepared {
  Params params;
  at::Tensor q, k, v, extra_k, extra_v, out, lse, grad_out, dq, dk, dv, dextra_k, dextra_v, delta;
};

// Checks shared by both directions (the Python mirror, used by the fake, Triton and reference
// paths, makes the same checks in the same order with the same messages).
Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& extra_k, const c10::optional<at::Tensor>& extra_v, int64_t grid_h,
                 int64_t grid_w, int64_t n_text, double radius, int64_t window_h, int64_t window_w, double scale) {
  check_4d(q, "q", "[B, heads, N, D]");
  const int64_t B = q.size(0), heads = q.size(1), N = q.size(2), D = q.size(3);
  check_4d(k, "k", "[B, kv_heads, N, D]");
  check_dtype_device(k, "k", q);
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(2) == N && k.size(3) == D, "k: expected shape [", B, ", kv_heads, ", N,
                    ", ", D, "] (B, N and D of q), got ", k.sizes());
  TORCH_CHECK_VALUE(heads % kv_heads == 0, "k: expected kv_heads (dim 1) dividing the ", heads, " heads of q, got ",
                    kv_heads);
  check_float_tensor(v, "v");
  check_like(v, "v", k, "k");
  TORCH_CHECK_VALUE(extra_k.has_value() || !extra_v.has_value(),
                    "extra_k: expected a tensor because extra_v is given, got None");
  TORCH_CHECK_VALUE(extra_v.has_value() || !extra_k.has_value(),
                    "extra_v: expected a tensor because extra_k is given, got None");
  int64_t n_extra = 0;
  if (extra_k.has_value()) {
    const auto& ek = *extra_k;
    check_4d(ek, "extra_k", "[B, kv_heads, E, D]");
    check_dtype_device(ek, "extra_k", q);
    TORCH_CHECK_VALUE(ek.size(0) == B && ek.size(1) == kv_heads && ek.size(3) == D, "extra_k: expected shape [", B,
                      ", ", kv_heads, ", E, ", D, "] (B, kv_heads and D of k), got ", ek.sizes());
    check_float_tensor(*extra_v, "extra_v");
    check_like(*extra_v, "extra_v", ek, "extra_k");
    n_extra = ek.size(2);
  }
  TORCH_CHECK_VALUE(grid_h >= 1, "grid_h: expected >= 1, got ", grid_h);
  TORCH_CHECK_VALUE(grid_w >= 1, "grid_w: expected >= 1, got ", grid_w);
  TORCH_CHECK_VALUE(n_text >= 0, "n_text: expected >= 0, got ", n_text);
  TORCH_CHECK_VALUE(N == n_text + grid_h * grid_w, "q: expected N (dim 2) = n_text + grid_h * grid_w = ", n_text,
                    " + ", grid_h, " * ", grid_w, " = ", n_text + grid_h * grid_w, ", got ", N);
  if (window_h == -1 && window_w == -1) {
    TORCH_CHECK_VALUE(std::isfinite(radius) && radius >= 1,
                      "radius: expected a finite number >= 1 (or 0 with a window), got ", double_repr(radius));
  } else {
    TORCH_CHECK_VALUE(radius == 0, "radius: expected 0 with a window (window_h, window_w >= 0), got ",
                      double_repr(radius));
    TORCH_CHECK_VALUE(window_h >= 0, "window_h: expected >= 0 (or -1 with both, for a circle), got ", window_h);
    TORCH_CHECK_VALUE(window_w >= 0, "window_w: expected >= 0 (or -1 with both, for a circle), got ", window_w);
  }
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale: expected a finite number > 0, got ",
                    double_repr(scale));

  Prepared s;
  const auto ct = compute_type(q);
  s.q = q.to(ct).contiguous();
  s.k = k.to(ct).contiguous();
  s.v = v.to(ct).contiguous();
  if (n_extra > 0) {
    s.extra_k = extra_k->to(ct).contiguous();
    s.extra_v = extra_v->to(ct).contiguous();
  }
  Params& p = s.params;
  p = Params{};
  p.q = s.q.const_data_ptr();
  p.k = s.k.const_data_ptr();
  p.v = s.v.const_data_ptr();
  p.extra_k = n_extra > 0 ? s.extra_k.const_data_ptr() : nullptr;
  p.extra_v = n_extra > 0 ? s.extra_v.const_data_ptr() : nullptr;
  p.dtype = to_dtype(ct, "q");
  p.batch = B;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.seq_len = N;
  p.n_extra = n_extra;
  p.head_dim = D;
  p.grid_h = grid_h;
  p.grid_w = grid_w;
  p.n_text = n_text;
  p.radius = radius;
  p.window_h = window_h;
  p.window_w = window_w;
  p.scale = scale;
  return s;
}

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU tensor for the CPU kernel, got ", q.device());
}

template <template <typename> class K>
void run_for_dtype(const Params& p) {
  if (p.dtype == DType::kFloat64) K<double>::run(p);
  else K<float>::run(p);
}
template <typename T> struct Forward { static void run(const Params& p) { forward_kernel<T>(p); } };
template <typename T> struct Backward { static void run(const Params& p) { backward_kernel<T>(p); } };

std::tuple<at::Tensor, at::Tensor> local_window_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& extra_k,
    const c10::optional<at::Tensor>& extra_v, int64_t grid_h, int64_t grid_w, int64_t n_text, double radius,
    int64_t window_h, int64_t window_w, double scale) {
  Prepared s = prepare(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w, scale);
  check_cpu(q);
  s.out = at::empty_like(s.q);
  s.lse = at::empty({q.size(0), q.size(1), q.size(2)}, s.q.options());
  s.params.out = s.out.mutable_data_ptr();
  s.params.lse = s.lse.mutable_data_ptr();
  run_for_dtype<Forward>(s.params);
  return {s.out.to(q.scalar_type()), s.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& extra_k, const c10::optional<at::Tensor>& extra_v, const at::Tensor& out,
    const at::Tensor& lse, int64_t grid_h, int64_t grid_w, int64_t n_text, double radius, int64_t window_h,
    int64_t window_w, double scale) {
  Prepared s = prepare(q, k, v, extra_k, extra_v, grid_h, grid_w, n_text, radius, window_h, window_w, scale);
  const auto ct = compute_type(q);
  check_float_tensor(grad_out, "grad_out");
  check_like(grad_out, "grad_out", q, "q");
  check_float_tensor(out, "out");
  check_like(out, "out", q, "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == ct, "lse: expected dtype in ['", dtype_name(ct), "'], got ",
                   dtype_name(lse.scalar_type()));
  TORCH_CHECK_VALUE(lse.numel() > 0, "lse: expected a non-empty tensor, got shape ", lse.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 3), "lse: expected shape ", q.sizes().slice(0, 3),
                    " ([B, heads, N] of q), got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse: expected device ", q.device(), " (the device of q), got ",
                    lse.device());
  check_cpu(q);
  s.grad_out = grad_out.to(ct).contiguous();
  s.out = out.to(ct).contiguous();
  s.lse = lse.contiguous();
  s.delta = at::empty_like(s.lse);
  s.dq = at::empty_like(s.q);
  s.dk = at::empty_like(s.k);
  s.dv = at::empty_like(s.k);
  const int64_t n_extra = s.params.n_extra;
  s.dextra_k = at::empty({k.size(0), k.size(1), n_extra, k.size(3)}, s.k.options());
  s.dextra_v = at::empty({k.size(0), k.size(1), n_extra, k.size(3)}, s.k.options());
  Params& p = s.params;
  p.grad_out = s.grad_out.const_data_ptr();
  p.out = const_cast<void*>(s.out.const_data_ptr());  // read only by the backward
  p.lse = const_cast<void*>(s.lse.const_data_ptr());
  p.delta = s.delta.mutable_data_ptr();
  p.dq = s.dq.mutable_data_ptr();
  p.dk = s.dk.mutable_data_ptr();
  p.dv = s.dv.mutable_data_ptr();
  p.dextra_k = n_extra > 0 ? s.dextra_k.mutable_data_ptr() : nullptr;
  p.dextra_v = n_extra > 0 ? s.dextra_v.mutable_data_ptr() : nullptr;
  run_for_dtype<Backward>(p);
  const auto in_type = q.scalar_type();
  return {s.dq.to(in_type), s.dk.to(in_type), s.dv.to(in_type), s.dextra_k.to(in_type), s.dextra_v.to(in_type)};
}

}  // namespace
}  // namespace local_window_attention
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.ops.local_window_attention");
  m.def("local_window_attention(Tensor q, Tensor k, Tensor v, Tensor? extra_k, Tensor? extra_v, int grid_h, "
        "int grid_w, int n_text, float radius, int window_h, int window_w, float scale) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("local_window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? extra_k, "
        "Tensor? extra_v, Tensor out, Tensor lse, int grid_h, int grid_w, int n_text, float radius, int window_h, "
        "int window_w, float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dextra_k, Tensor dextra_v)",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) {
  m.impl("local_window_attention", &fewstep::local_window_attention::local_window_attention_cpu);
  m.impl("local_window_attention_backward", &fewstep::local_window_attention::local_window_attention_backward_cpu);
}
