// Multi-tensor AdamW step with an optional EMA: op schema, argument checks and the CPU kernel.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "adamw/adamw_torch.h"
#include "fewstep/checks.h"
#include "fewstep/multi_tensor_cpu.h"

namespace fewstep {
namespace adamw {
namespace {

constexpr int64_t kCpuBlock = 1 << 14;

// Parameter element type P (and its gradient's); moments and EMA in the compute type C.
// The coefficients are copied into a local, the arrays declared __restrict and the EMA's branch
// taken outside the loops: otherwise GCC reloads the coefficients every element (a store might
// change them) and does not vectorise the loop. 16 x 1M fp32 parameters on the 2-core CI
// machine: 28 -> 8.5 ms (bench/results/2026-12-08-cpu-openmp.md).
template <typename P, typename C = std::conditional_t<std::is_same_v<P, double>, double, float>>
void step_range(const Coeffs<C>& coeffs, const TensorTable& t, int i, int64_t begin, int64_t end) {
  const Coeffs<C> c = coeffs;
  P* __restrict x = static_cast<P*>(t.param[i]);
  const P* __restrict g = static_cast<const P*>(t.grad[i]);
  C* __restrict m = static_cast<C*>(t.exp_avg[i]);
  C* __restrict v = static_cast<C*>(t.exp_avg_sq[i]);
  C* __restrict e = static_cast<C*>(t.ema[i]);
  if (e == nullptr) {
    for (int64_t j = begin; j < end; ++j)
      x[j] = static_cast<P>(c.update(static_cast<C>(x[j]), static_cast<C>(g[j]), m[j], v[j]));
    return;
  }
  for (int64_t j = begin; j < end; ++j) {
    const P xj = static_cast<P>(c.update(static_cast<C>(x[j]), static_cast<C>(g[j]), m[j], v[j]));
    x[j] = xj;
    e[j] = lerp(e[j], static_cast<C>(xj), c.ema_weight);
  }
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList ema_params, int64_t step, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double ema_decay) {
  TORCH_CHECK_VALUE(params.empty() || params[0].device().is_cpu(),
                    "params[0]: expected a CPU tensor for the CPU kernel, got ", params[0].device());
  const PreparedStep prepared = prepare_step(params, grads, exp_avgs, exp_avg_sqs, ema_params, step, lr, beta1,
                                             beta2, eps, weight_decay, ema_decay, kCpuBlock);
  const Coeffs<float> c32(prepared.params);
  const Coeffs<double> c64(prepared.params);
  for (const auto& table : prepared.tables) {
    const TensorTable& t = *table;
    parallel_for_each_block(t.index, kCpuBlock, [&](int i, int64_t begin, int64_t end) {
      switch (t.dtype[i]) {
        case DType::kFloat64: return step_range<double>(c64, t, i, begin, end);
        case DType::kFloat16: return step_range<c10::Half>(c32, t, i, begin, end);
        case DType::kBFloat16: return step_range<c10::BFloat16>(c32, t, i, begin, end);
        default: return step_range<float>(c32, t, i, begin, end);
      }
    });
  }
}

// `t` (the i-th tensor of list `list`) must be a contiguous tensor of dtype `dtype` with the
// shape and device of params[i]. The name is built only on failure: this runs on every step.
void check_companion(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param,
                     at::ScalarType dtype) {
  const auto name = [&] { return std::string(list) + "[" + std::to_string(i) + "]"; };
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, name(), ": expected a dense (strided) tensor, got layout ",
                   t.layout());
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), name(), ": expected shape ", param.sizes(), " (the shape of params[",
                    i, "]), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name(), ": expected dtype ", dtype_name(dtype), " for a ",
                   dtype_name(param.scalar_type()), " parameter, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == param.device(), name(), ": expected device ", param.device(),
                    " (the device of params[", i, "]), got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name(), ": expected a contiguous tensor, got strides ", t.strides(),
                    " for shape ", t.sizes());
}

void check_count(at::TensorList list, const char* name, size_t expected) {
  TORCH_CHECK_VALUE(list.size() == expected, name, ": expected ", expected, " tensors (one per parameter), got ",
                    list.size());
}

}  // namespace

PreparedStep prepare_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList ema_params, int64_t step, double lr,
                          double beta1, double beta2, double eps, double weight_decay, double ema_decay,
                          int64_t elements_per_block) {
  const size_t n = params.size();
  check_count(grads, "grads", n);
  check_count(exp_avgs, "exp_avgs", n);
  check_count(exp_avg_sqs, "exp_avg_sqs", n);
  const bool has_ema = !ema_params.empty();
  TORCH_CHECK_VALUE(!has_ema || ema_params.size() == n, "ema_params: expected ", n,
                    " tensors (one per parameter) or none, got ", ema_params.size());
  TORCH_CHECK_VALUE(step >= 1, "step: expected the 1-based count of this update, got ", step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "lr: expected a finite number >= 0, got ", double_repr(lr));
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1: expected a number in [0, 1), got ", double_repr(beta1));
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2: expected a number in [0, 1), got ", double_repr(beta2));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps: expected a finite number > 0, got ", double_repr(eps));
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0,
                    "weight_decay: expected a finite number >= 0, got ", double_repr(weight_decay));
  TORCH_CHECK_VALUE(ema_decay >= 0 && ema_decay <= 1, "ema_decay: expected a number in [0, 1], got ",
                    double_repr(ema_decay));

  PreparedStep out;
  Params& p = out.params;
  p.decay = 1.0 - lr * weight_decay;
  p.one_minus_beta1 = 1.0 - beta1;
  p.beta2 = beta2;
  p.one_minus_beta2 = 1.0 - beta2;
  p.neg_step_size = -lr / (1.0 - std::pow(beta1, static_cast<double>(step)));
  p.bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  p.eps = eps;
  p.ema_weight = 1.0 - ema_decay;

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& x = params[i];
    const auto name = [i] { return "params[" + std::to_string(i) + "]"; };
    TORCH_CHECK_TYPE(x.layout() == at::kStrided, name(), ": expected a dense (strided) tensor, got layout ",
                     x.layout());
    TORCH_CHECK_VALUE(x.device() == params[0].device(), name(), ": expected device ", params[0].device(),
                      " (the device of params[0]), got ", x.device());
    const DType dt = to_dtype_named(x.scalar_type(), name);
    TORCH_CHECK_VALUE(x.is_contiguous(), name(), ": expected a contiguous tensor, got strides ", x.strides(),
                      " for shape ", x.sizes());
    const at::ScalarType state_type = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
    check_companion(grads[i], "grads", i, x, x.scalar_type());
    check_companion(exp_avgs[i], "exp_avgs", i, x, state_type);
    check_companion(exp_avg_sqs[i], "exp_avg_sqs", i, x, state_type);
    if (has_ema) check_companion(ema_params[i], "ema_params", i, x, state_type);
    if (x.numel() == 0) continue;
    const int j = append_tensor(out.tables, x.numel(), elements_per_block);
    TensorTable& t = *out.tables.back();
    t.param[j] = x.data_ptr();
    t.grad[j] = grads[i].const_data_ptr();
    t.exp_avg[j] = exp_avgs[i].data_ptr();
    t.exp_avg_sq[j] = exp_avg_sqs[i].data_ptr();
    t.ema[j] = has_ema ? ema_params[i].data_ptr() : nullptr;
    t.dtype[j] = dt;
  }
  return out;
}

}  // namespace adamw
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.ops.adamw");
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] ema_params, int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float ema_decay) -> ()",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) { m.impl("adamw_step_", &fewstep::adamw::adamw_step_cpu); }
