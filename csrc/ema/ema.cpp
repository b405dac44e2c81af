// Multi-tensor EMA update: op schema, argument checks and the CPU kernel.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "ema/ema_torch.h"
#include "fewstep/checks.h"
#include "fewstep/multi_tensor_cpu.h"

namespace fewstep {
namespace ema {
namespace {

constexpr int64_t kCpuBlock = 1 << 14;

template <typename E, typename P, typename C>
void update_range(void* ema, const void* param, int64_t begin, int64_t end, C w) {
  E* e = static_cast<E*>(ema);
  const P* x = static_cast<const P*>(param);
  for (int64_t j = begin; j < end; ++j) {
    const C ev = static_cast<C>(e[j]);
    e[j] = static_cast<E>(lerp(ev, static_cast<C>(x[j]), w));
  }
}

template <typename E>
void update_range_for(DType pd, void* ema, const void* param, int64_t begin, int64_t end, float w) {
  switch (pd) {
    case DType::kFloat16: return update_range<E, c10::Half, float>(ema, param, begin, end, w);
    case DType::kBFloat16: return update_range<E, c10::BFloat16, float>(ema, param, begin, end, w);
    default: return update_range<E, float, float>(ema, param, begin, end, w);
  }
}

void ema_update_cpu(at::TensorList ema, at::TensorList params, double decay) {
  TORCH_CHECK_VALUE(ema.empty() || ema[0].device().is_cpu(), "ema[0]: expected a CPU tensor for the CPU kernel, got ",
                    ema[0].device());
  const auto tables = prepare_ema(ema, params, decay, kCpuBlock);
  const double w = 1.0 - decay;
  for (const auto& table : tables) {
    const TensorTable& t = *table;
    parallel_for_each_block(t.index, kCpuBlock, [&](int i, int64_t begin, int64_t end) {
      switch (t.ema_dtype[i]) {
        case DType::kFloat64: return update_range<double, double, double>(t.ema[i], t.param[i], begin, end, w);
        case DType::kFloat16: return update_range_for<c10::Half>(t.param_dtype[i], t.ema[i], t.param[i], begin, end, w);
        case DType::kBFloat16:
          return update_range_for<c10::BFloat16>(t.param_dtype[i], t.ema[i], t.param[i], begin, end, w);
        default: return update_range_for<float>(t.param_dtype[i], t.ema[i], t.param[i], begin, end, w);
      }
    });
  }
}

}  // namespace

std::vector<std::unique_ptr<TensorTable>> prepare_ema(at::TensorList ema, at::TensorList params, double decay,
                                                      int64_t elements_per_block) {
  TORCH_CHECK_VALUE(ema.size() == params.size(), "params: expected ", ema.size(), " tensors (one per ema tensor), got ",
                    params.size());
  TORCH_CHECK_VALUE(std::isfinite(decay) && decay >= 0 && decay <= 1, "decay: expected a number in [0, 1], got ",
                    double_repr(decay));
  std::vector<std::unique_ptr<TensorTable>> tables;
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& x = params[i];
    // Names are built only when a check fails: this loop runs every training step.
    const auto ename = [i] { return "ema[" + std::to_string(i) + "]"; };
    const auto pname = [i] { return "params[" + std::to_string(i) + "]"; };
    TORCH_CHECK_VALUE(e.device() == ema[0].device(), ename(), ": expected device ", ema[0].device(),
                      " (the device of ema[0]), got ", e.device());
    TORCH_CHECK_VALUE(x.device() == e.device(), pname(), ": expected device ", e.device(), " (the device of ",
                      ename(), "), got ", x.device());
    TORCH_CHECK_VALUE(x.sizes() == e.sizes(), pname(), ": expected shape ", e.sizes(), " (the shape of ", ename(),
                      "), got ", x.sizes());
    TORCH_CHECK_VALUE(e.is_contiguous() && x.is_contiguous(), ename(), ", ", pname(),
                      ": expected contiguous tensors, got strides ", e.strides(), " and ", x.strides());
    const DType ed = to_dtype_named(e.scalar_type(), ename), pd = to_dtype_named(x.scalar_type(), pname);
    TORCH_CHECK_TYPE((ed == DType::kFloat64) == (pd == DType::kFloat64), pname(), ": expected torch.float64 with a ",
                     "torch.float64 ema (and not otherwise), got ", dtype_name(x.scalar_type()), " for ",
                     dtype_name(e.scalar_type()));
    if (e.numel() == 0) continue;
    const int j = append_tensor(tables, e.numel(), elements_per_block);
    TensorTable& t = *tables.back();
    t.ema[j] = e.data_ptr();
    t.param[j] = x.const_data_ptr();
    t.ema_dtype[j] = ed;
    t.param_dtype[j] = pd;
  }
  return tables;
}

}  // namespace ema
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.ops.ema");
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] params, float decay) -> ()", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) { m.impl("ema_update_", &fewstep::ema::ema_update_cpu); }
