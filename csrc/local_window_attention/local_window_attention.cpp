// Local-window (CLEAR) attention: op schemas, argument checks and the CPU kernels.
//
// Forward, per block of queries: scores of the admitted keys (rows and spans, never all N), then
// softmax and the weighted sum of values; lse = max + log(sum). Backward: each block of queries
// recomputes the probabilities as the forward made them, writes dQ and adds its share into dK and
// dV; the blocks of a kv head run in a few chunks with a part of dK and dV each, summed at the
// end. Every sum runs in a fixed order (no atomics; the chunks depend on the shape alone), so
// results do not depend on the thread count. Kernels: local_window_attention_cpu.inc.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "fewstep/checks.h"
#include "local_window_attention/local_window_attention.h"

namespace fewstep {
namespace local_window_attention {
namespace {

// The CPU backward (`backward` in local_window_attention_cpu.inc) runs one task per (batch, kv
// head, chunk of query blocks): enough chunks for kBackwardTasks tasks, each costing a part of
// dK and dV of the kv head's size. Chosen by shape alone, so that results do not depend on the
// thread count.
constexpr int64_t kBackwardTasks = 8;
int64_t backward_chunks(int64_t batch, int64_t kv_heads, int64_t heads, int64_t query_blocks) {
  const int64_t chunks = (kBackwardTasks + batch * kv_heads - 1) / (batch * kv_heads);
  return std::max<int64_t>(1, std::min(chunks, heads / kv_heads * query_blocks));
}

// The kernels twice: for AVX2 + FMA, chosen at run time when the CPU has them, and for the
// compiler's baseline, so that the extension needs no special build flags. FEWSTEP_CPU_ISA=baseline
// forces the baseline copy (its tests run on AVX2 machines too).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEWSTEP_LWA_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FEWSTEP_LWA_ISA avx2
#include "local_window_attention/local_window_attention_cpu.inc"
#undef FEWSTEP_LWA_ISA
#pragma GCC pop_options
#else
#define FEWSTEP_LWA_HAVE_AVX2 0
#endif
#define FEWSTEP_LWA_ISA baseline
#include "local_window_attention/local_window_attention_cpu.inc"
#undef FEWSTEP_LWA_ISA

#if FEWSTEP_LWA_HAVE_AVX2
bool use_avx2() {
  static const bool use = [] {
    const char* isa = std::getenv("FEWSTEP_CPU_ISA");
    return !(isa && std::strcmp(isa, "baseline") == 0) && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return use;
}
#endif

template <typename T>
void run_forward(const Params& p) {
#if FEWSTEP_LWA_HAVE_AVX2
  if (use_avx2()) return avx2::forward<T>(p);
#endif
  baseline::forward<T>(p);
}

template <typename T>
void run_backward(const Params& p) {
#if FEWSTEP_LWA_HAVE_AVX2
  if (use_avx2()) return avx2::backward<T>(p);
#endif
  baseline::backward<T>(p);
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
  at::Tensor q, k, v, extra_k, extra_v, out, lse, grad_out, dq, dk, dv, dextra_k, dextra_v, dk_parts, dv_parts;
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
  if (s.params.dtype == DType::kFloat64) run_forward<double>(s.params);
  else run_forward<float>(s.params);
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
  // lse is checked but not read: the kernel recomputes each row's max and sum (see the kernel)
  s.dq = at::empty_like(s.q);
  s.dk = at::empty_like(s.k);
  s.dv = at::empty_like(s.k);
  const int64_t n_extra = s.params.n_extra;
  s.dextra_k = at::empty({k.size(0), k.size(1), n_extra, k.size(3)}, s.k.options());
  s.dextra_v = at::empty({k.size(0), k.size(1), n_extra, k.size(3)}, s.k.options());
  Params& p = s.params;
  p.backward_chunks = backward_chunks(p.batch, p.kv_heads, p.heads, static_cast<int64_t>(query_blocks(p).size()));
  s.dk_parts = at::empty({p.batch * p.kv_heads * (p.backward_chunks - 1), p.seq_len + n_extra, p.head_dim},
                         s.k.options());
  s.dv_parts = at::empty_like(s.dk_parts);
  p.grad_out = s.grad_out.const_data_ptr();
  p.out = const_cast<void*>(s.out.const_data_ptr());  // read only by the backward
  p.dk_parts = s.dk_parts.mutable_data_ptr();
  p.dv_parts = s.dv_parts.mutable_data_ptr();
  p.dq = s.dq.mutable_data_ptr();
  p.dk = s.dk.mutable_data_ptr();
  p.dv = s.dv.mutable_data_ptr();
  p.dextra_k = n_extra > 0 ? s.dextra_k.mutable_data_ptr() : nullptr;
  p.dextra_v = n_extra > 0 ? s.dextra_v.mutable_data_ptr() : nullptr;
  if (p.dtype == DType::kFloat64) run_backward<double>(p);
  else run_backward<float>(p);
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
