// SaRA sparse updates: op schemas, argument checks and the CPU kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "fewstep/checks.h"
#include "sara/sara_torch.h"

namespace fewstep {
namespace sara {
namespace {

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

Format to_format(int64_t f, const char* name) {
  TORCH_CHECK_VALUE(f == 0 || f == 1, name, ": expected 0 (sorted indices) or 1 (bitmask), got ", f);
  return static_cast<Format>(f);
}

void check_int32_vector(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, ": expected dtype torch.int32, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, ": expected a contiguous 1-D tensor, got shape ",
                    t.sizes(), " with strides ", t.strides());
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected device ", device, ", got ", t.device());
}

void check_fp32_vector(const at::Tensor& t, const char* name, const at::Device& device, int64_t size) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected dtype torch.float32, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, ": expected a contiguous 1-D tensor, got shape ",
                    t.sizes(), " with strides ", t.strides());
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected device ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(size < 0 || t.numel() == size, name, ": expected ", size, " elements, got ", t.numel());
}

int64_t words_for(int64_t n) { return (n + 31) / 32; }
int64_t chunks_for(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Serial version of the CUDA traversal in sara_kernel.cu, with the same bounds checks.
template <class F>
void for_each_selected(Format format, const int32_t* selection, const int32_t* chunk_offsets, int64_t numel,
                       int64_t k, int64_t unit, F&& f) {
  if (format == Format::kIndices) {
    const int64_t end = std::min(k, (unit + 1) * kUnitEntries);
    for (int64_t slot = unit * kUnitEntries; slot < end; ++slot) {
      const int64_t dense = selection[slot];
      if (dense >= 0 && dense < numel) f(dense, slot);
    }
    return;
  }
  const int64_t num_words = words_for(numel);
  const int64_t word_end = std::min(num_words, (unit + 1) * 32);
  int64_t slot = chunk_offsets[unit];
  for (int64_t w = unit * 32; w < word_end; ++w) {
    uint32_t bits = static_cast<uint32_t>(selection[w]);
    const int tail = static_cast<int>(numel & 31);
    if (w == num_words - 1 && tail != 0) bits &= (1u << tail) - 1u;
    while (bits != 0) {
      const int b = __builtin_ctz(bits);
      if (slot >= 0 && slot < k) f(w * 32 + b, slot);
      ++slot;
      bits &= bits - 1u;
    }
  }
}

float load_as_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case DType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

void store_from_float(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<c10::Half*>(base)[i] = c10::Half(v); break;
    case DType::kBFloat16: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

void gather_cpu(const at::Tensor& grad, at::Tensor out, const at::Tensor& selection, const at::Tensor& chunk_offsets,
                int64_t format, double scale) {
  TORCH_CHECK_VALUE(grad.device().is_cpu(), "grad: expected a CPU tensor for the CPU kernel, got ", grad.device());
  const PreparedGather g = prepare_gather(grad, out, selection, chunk_offsets, format, scale);
  const GatherParams& p = g.params;
  // Units are independent (disjoint compact slots), so they run in parallel.
  at::parallel_for(0, num_units(p.format, p.numel, p.k), 16, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      for_each_selected(p.format, p.selection, p.chunk_offsets, p.numel, p.k, unit, [&](int64_t dense, int64_t slot) {
        p.out[slot] += p.scale * load_as_float(p.grad, p.grad_dtype, dense);
      });
    }
  });
}

void adamw_step_cpu(at::TensorList weights, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor master,
                    const at::Tensor& grad, const at::Tensor& layout, const at::Tensor& selection,
                    const at::Tensor& chunk_offsets, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step) {
  TORCH_CHECK_VALUE(exp_avg.device().is_cpu(), "exp_avg: expected a CPU tensor for the CPU kernel, got ",
                    exp_avg.device());
  const PreparedAdamW prepared = prepare_adamw(weights, exp_avg, exp_avg_sq, master, grad, layout, selection,
                                               chunk_offsets, lr, beta1, beta2, eps, weight_decay, step);
  const AdamWParams& p = prepared.params;
  for (const auto& table : prepared.tables) {
    const TensorTable& t = *table;
    at::parallel_for(0, t.unit_begin[t.num_tensors], 16, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int i = static_cast<int>(std::upper_bound(t.unit_begin, t.unit_begin + t.num_tensors, unit) -
                                       t.unit_begin) - 1;
        const int64_t cb = t.compact_begin[i], mb = t.master_begin[i];
        void* const w = t.weight[i];
        const DType dt = t.dtype[i];
        for_each_selected(t.format[i], p.selection + t.sel_begin[i], p.chunk_offsets + t.chunk_begin[i], t.numel[i],
                          t.k[i], unit - t.unit_begin[i], [&](int64_t dense, int64_t slot) {
                            const int64_t c = cb + slot;
                            const float g = p.grad[c];
                            float m = p.exp_avg[c], v = p.exp_avg_sq[c];
                            float x = mb >= 0 ? p.master[mb + slot] : load_as_float(w, dt, dense);
                            x *= p.decay;
                            m += p.one_minus_beta1 * (g - m);
                            v = v * p.beta2 + p.one_minus_beta2 * g * g;
                            x -= p.step_size * (m / (std::sqrt(v) / p.bc2_sqrt + p.eps));
                            p.exp_avg[c] = m;
                            p.exp_avg_sq[c] = v;
                            if (mb >= 0) p.master[mb + slot] = x;
                            store_from_float(w, dt, dense, x);
                          });
      }
    });
  }
}

}  // namespace

PreparedGather prepare_gather(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& selection,
                              const at::Tensor& chunk_offsets, int64_t format, double scale) {
  TORCH_CHECK_VALUE(grad.defined() && grad.numel() > 0, "grad: expected a non-empty tensor");
  const DType grad_dtype = to_dtype(grad.scalar_type(), "grad", /*allow_double=*/false);
  TORCH_CHECK_VALUE(grad.numel() <= kMaxInt32, "grad: expected at most 2^31-1 elements (int32 selections), got ",
                    grad.numel());
  const Format f = to_format(format, "format");
  check_fp32_vector(out, "out", grad.device(), -1);
  check_int32_vector(selection, "selection", grad.device());
  check_int32_vector(chunk_offsets, "chunk_offsets", grad.device());
  check_finite(scale, "scale");
  const int64_t n = grad.numel(), k = out.numel();
  TORCH_CHECK_VALUE(k <= n, "out: expected at most grad.numel()=", n, " selected entries, got ", k);
  if (f == Format::kIndices) {
    TORCH_CHECK_VALUE(selection.numel() == k, "selection: expected ", k,
                      " sorted indices (one per element of out), got ", selection.numel());
  } else {
    TORCH_CHECK_VALUE(selection.numel() == words_for(n), "selection: expected ", words_for(n),
                      " bitmask words for a gradient of ", n, " elements, got ", selection.numel());
    TORCH_CHECK_VALUE(chunk_offsets.numel() == chunks_for(n), "chunk_offsets: expected ", chunks_for(n),
                      " chunk offsets for a gradient of ", n, " elements, got ", chunk_offsets.numel());
  }
  PreparedGather g;
  g.grad = grad.contiguous();
  GatherParams& p = g.params;
  p.grad = g.grad.const_data_ptr();
  p.grad_dtype = grad_dtype;
  p.out = out.mutable_data_ptr<float>();
  p.selection = selection.const_data_ptr<int32_t>();
  p.chunk_offsets = chunk_offsets.const_data_ptr<int32_t>();
  p.format = f;
  p.numel = n;
  p.k = k;
  p.scale = static_cast<float>(scale);
  return g;
}

PreparedAdamW prepare_adamw(at::TensorList weights, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& master, const at::Tensor& grad, const at::Tensor& layout,
                            const at::Tensor& selection, const at::Tensor& chunk_offsets, double lr,
                            double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const int64_t num_tensors = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(num_tensors > 0, "weights: expected at least one tensor, got an empty list");
  const at::Device device = weights[0].device();
  TORCH_CHECK_TYPE(layout.scalar_type() == at::kLong, "layout: expected dtype torch.int64, got ",
                   dtype_name(layout.scalar_type()));
  TORCH_CHECK_VALUE(layout.device().is_cpu() && layout.is_contiguous(),
                    "layout: expected a contiguous CPU tensor, got one on ", layout.device());
  TORCH_CHECK_VALUE(layout.dim() == 2 && layout.size(0) == num_tensors && layout.size(1) == kLayoutCols,
                    "layout: expected shape [", num_tensors, ", ", int(kLayoutCols), "] (one row per weight), got ",
                    layout.sizes());
  const int64_t total = grad.numel();
  TORCH_CHECK_VALUE(total <= kMaxInt32, "grad: expected at most 2^31-1 selected entries, got ", total);
  check_fp32_vector(grad, "grad", device, -1);
  check_fp32_vector(exp_avg, "exp_avg", device, total);
  check_fp32_vector(exp_avg_sq, "exp_avg_sq", device, total);
  check_fp32_vector(master, "master", device, -1);
  TORCH_CHECK_VALUE(master.numel() <= kMaxInt32, "master: expected at most 2^31-1 entries, got ", master.numel());
  check_int32_vector(selection, "selection", device);
  check_int32_vector(chunk_offsets, "chunk_offsets", device);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "lr: expected a finite number >= 0, got ", double_repr(lr));
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1: expected a number in [0, 1), got ", double_repr(beta1));
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2: expected a number in [0, 1), got ", double_repr(beta2));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps: expected a finite number > 0, got ", double_repr(eps));
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0,
                    "weight_decay: expected a finite number >= 0, got ", double_repr(weight_decay));
  TORCH_CHECK_VALUE(step >= 1, "step: expected the 1-based count of this update, got ", step);

  PreparedAdamW out;
  AdamWParams& p = out.params;
  p.grad = grad.const_data_ptr<float>();
  p.exp_avg = exp_avg.mutable_data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.mutable_data_ptr<float>();
  p.master = master.numel() > 0 ? master.mutable_data_ptr<float>() : nullptr;
  p.selection = selection.const_data_ptr<int32_t>();
  p.chunk_offsets = chunk_offsets.const_data_ptr<int32_t>();
  p.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  p.decay = static_cast<float>(1.0 - lr * weight_decay);
  p.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  p.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));

  const int64_t* rows = layout.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (i % kMaxTensorsPerLaunch == 0) {
      out.tables.push_back(std::make_unique<TensorTable>());
      out.tables.back()->num_tensors = 0;
      out.tables.back()->unit_begin[0] = 0;
    }
    TensorTable& t = *out.tables.back();
    const int j = t.num_tensors;
    const at::Tensor& w = weights[i];
    const int64_t* row = rows + i * kLayoutCols;
    // Built only when a check fails: this loop runs on every optimizer step.
    const auto name = [i] { return "weights[" + std::to_string(i) + "]"; };
    TORCH_CHECK_VALUE(w.device() == device, name(), ": expected device ", device, " (the device of weights[0]), got ",
                      w.device());
    const DType dt = to_dtype_named(w.scalar_type(), name, /*allow_double=*/false);
    TORCH_CHECK_VALUE(w.is_contiguous(), name(), ": expected a contiguous tensor, got strides ", w.strides(),
                      " for shape ", w.sizes());
    const int64_t n = w.numel(), k = row[kColK], cb = row[kColCompactBegin], mb = row[kColMasterBegin];
    const int64_t sb = row[kColSelBegin], chb = row[kColChunkBegin];
    const Format f = to_format(row[kColFormat], "layout[:, 0]");
    TORCH_CHECK_VALUE(row[kColNumel] == n && n <= kMaxInt32, "layout row ", i, ": expected numel ", n, " (", name(),
                      "'s, at most 2^31-1), got ", row[kColNumel]);
    TORCH_CHECK_VALUE(k >= 0 && k <= n && cb >= 0 && cb + k <= total, "layout row ", i, ": expected 0 <= k <= ", n,
                      " and slots [compact_begin, compact_begin + k) inside grad's ", total, ", got k=", k,
                      " compact_begin=", cb);
    if (dt == DType::kFloat32) {
      TORCH_CHECK_VALUE(mb == -1, "layout row ", i, ": expected master_begin -1 for a torch.float32 weight, got ", mb);
    } else {
      TORCH_CHECK_VALUE(mb >= 0 && mb + k <= master.numel(), "layout row ", i, ": expected master slots [", mb, ", ",
                        mb + k, ") inside master's ", master.numel(), " for a ", dtype_name(w.scalar_type()),
                        " weight");
    }
    if (f == Format::kIndices) {
      TORCH_CHECK_VALUE(sb >= 0 && sb + k <= selection.numel(), "layout row ", i, ": expected indices [", sb, ", ",
                        sb + k, ") inside selection's ", selection.numel());
    } else {
      TORCH_CHECK_VALUE(sb >= 0 && sb + words_for(n) <= selection.numel() && chb >= 0 &&
                            chb + chunks_for(n) <= chunk_offsets.numel(),
                        "layout row ", i, ": expected bitmask words [", sb, ", ", sb + words_for(n),
                        ") inside selection's ", selection.numel(), " and chunk offsets [", chb, ", ",
                        chb + chunks_for(n), ") inside chunk_offsets' ", chunk_offsets.numel());
    }
    t.weight[j] = w.data_ptr();
    t.numel[j] = static_cast<int32_t>(n);
    t.k[j] = static_cast<int32_t>(k);
    t.compact_begin[j] = static_cast<int32_t>(cb);
    t.master_begin[j] = static_cast<int32_t>(mb);
    t.sel_begin[j] = static_cast<int32_t>(sb);
    t.chunk_begin[j] = static_cast<int32_t>(chb);
    t.dtype[j] = dt;
    t.format[j] = f;
    t.unit_begin[j + 1] = t.unit_begin[j] + num_units(f, n, k);
    t.num_tensors = j + 1;
  }
  return out;
}

}  // namespace sara
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.ops.sara");
  m.def(
      "sara_gather_(Tensor grad, Tensor(a!) out, Tensor selection, Tensor chunk_offsets, int format, float scale) "
      "-> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sara_adamw_step_(Tensor(a!)[] weights, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) master, "
      "Tensor grad, Tensor layout, Tensor selection, Tensor chunk_offsets, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step) -> ()",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) {
  m.impl("sara_gather_", &fewstep::sara::gather_cpu);
  m.impl("sara_adamw_step_", &fewstep::sara::adamw_step_cpu);
}
