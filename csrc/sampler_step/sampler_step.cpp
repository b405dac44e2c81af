// Fused sampler step: op schemas, shared torch glue and the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "fewstep/checks.h"
#include "sampler_step/sampler_step_torch.h"

namespace fewstep {
namespace sampler_step {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "fewstep: unsupported dtype ", dtype_name(t));
  }
}

namespace {
const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
at::Tensor contiguous_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}
}  // namespace

PreparedStep prepare_step(const at::Tensor& x, const at::Tensor& model_output,
                          const c10::optional<at::Tensor>& uncond,
                          const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& prev_x0,
                          const c10::optional<at::Tensor>& cfg_rescale, c10::ArrayRef<double> coeffs,
                          double guidance_scale, double clip_x0, bool return_x0) {
  check_float_tensor(x, "x");
  check_like(model_output, "model_output", x, "x");
  check_like(uncond, "uncond", x, "x");
  check_like(noise, "noise", x, "x");
  check_like(prev_x0, "prev_x0", x, "x");
  TORCH_CHECK_VALUE(coeffs.size() == kNumCoeffs, "coeffs: expected ", int(kNumCoeffs),
                    " coefficients (fewstep.ops.StepCoeffs.as_list()), got ", coeffs.size());
  for (double c : coeffs) check_finite(c, "coeffs");
  check_finite(guidance_scale, "guidance_scale");
  TORCH_CHECK_VALUE(clip_x0 > 0, "clip_x0: expected a positive bound (inf for none), got ", double_repr(clip_x0));
  const int64_t batch = x.dim() > 0 ? x.size(0) : 1;
  if (cfg_rescale.has_value()) {
    const auto& r = *cfg_rescale;
    const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_TYPE(r.scalar_type() == want, "cfg_rescale: expected dtype ", dtype_name(want),
                     " (fewstep.ops.cfg_rescale_factor's, for x of dtype ", dtype_name(x.scalar_type()), "), got ",
                     dtype_name(r.scalar_type()));
    TORCH_CHECK_VALUE(r.dim() == 1 && r.size(0) == batch && r.device() == x.device(), "cfg_rescale: expected shape [",
                      batch, "] on ", x.device(), " (one factor per sample of x), got ", r.sizes(), " on ", r.device());
  }
  TORCH_CHECK_VALUE(noise.has_value() || (coeffs[kOz] == 0 && coeffs[kChurn] == 0),
                    "noise: expected a tensor because coeffs o_z=", double_repr(coeffs[kOz]), " and k_churn=",
                    double_repr(coeffs[kChurn]), " use it, got None");
  TORCH_CHECK_VALUE(prev_x0.has_value() || coeffs[kOp] == 0, "prev_x0: expected a tensor because coeffs o_p=",
                    double_repr(coeffs[kOp]), " uses it, got None");

  PreparedStep s;
  s.x = x.contiguous();
  s.model_output = model_output.contiguous();
  s.uncond = contiguous_or_empty(uncond);
  s.noise = contiguous_or_empty(noise);
  s.prev_x0 = contiguous_or_empty(prev_x0);
  s.rescale = contiguous_or_empty(cfg_rescale);
  s.out = at::empty_like(s.x);
  s.x0_out = return_x0 ? at::empty_like(s.x) : at::empty({0}, x.options());

  StepParams& p = s.params;
  p.x = s.x.const_data_ptr();
  p.model_output = s.model_output.const_data_ptr();
  p.uncond = ptr_or_null(s.uncond);
  p.noise = ptr_or_null(s.noise);
  p.prev_x0 = ptr_or_null(s.prev_x0);
  p.rescale = ptr_or_null(s.rescale);
  p.out = s.out.mutable_data_ptr();
  p.x0_out = return_x0 ? s.x0_out.mutable_data_ptr() : nullptr;
  p.numel = x.numel();
  p.per_sample = x.numel() / batch;
  std::copy(coeffs.begin(), coeffs.end(), p.coeffs);
  p.guidance_scale = guidance_scale;
  p.clip = clip_x0;
  p.dtype = to_dtype(x.scalar_type());
  return s;
}

PreparedRescale prepare_rescale(const at::Tensor& model_output, const at::Tensor& uncond,
                                double guidance_scale, double guidance_rescale) {
  check_float_tensor(model_output, "cond");
  check_like(uncond, "uncond", model_output, "cond");
  TORCH_CHECK_VALUE(model_output.dim() >= 2, "cond: expected a batched tensor [B, ...] with at least ",
                    "2 dims, got shape ", model_output.sizes());
  TORCH_CHECK_VALUE(model_output.numel() / model_output.size(0) >= 2,
                    "cond: expected at least 2 elements per sample for a standard deviation, got shape ",
                    model_output.sizes());
  check_finite(guidance_scale, "guidance_scale");
  check_finite(guidance_rescale, "guidance_rescale");
  PreparedRescale s;
  s.cond = model_output.contiguous();
  s.uncond = uncond.contiguous();
  s.factor = at::empty({model_output.size(0)},
                       model_output.options().dtype(model_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  RescaleParams& p = s.params;
  p.cond = s.cond.const_data_ptr();
  p.uncond = s.uncond.const_data_ptr();
  p.partials = nullptr;
  p.factor = s.factor.mutable_data_ptr();
  p.batch = model_output.size(0);
  p.per_sample = model_output.numel() / p.batch;
  p.chunks = 0;
  p.guidance_scale = guidance_scale;
  p.guidance_rescale = guidance_rescale;
  p.dtype = to_dtype(model_output.scalar_type());
  return s;
}

namespace {

// CPU kernel: tiles of kTile elements that never straddle a sample, so each tile has one
// rescale factor; absent inputs read as zeros, which keeps the arithmetic loop branch-free
// and lets the compiler vectorize it.
constexpr int64_t kTile = 512;

template <typename T, typename C>
void load_tile(const void* base, int64_t begin, int64_t n, C* dst) {
  const T* src = static_cast<const T*>(base) + begin;
  if (base == nullptr) {
    std::fill(dst, dst + n, C(0));
    return;
  }
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<C>(src[j]);
}

template <typename T>
void step_cpu(const StepParams& p) {
  using C = at::opmath_type<T>;
  const double* k = p.coeffs;
  const C k_churn = k[kChurn], a_x = k[kAx], a_m = k[kAm], e_x = k[kEx], e_m = k[kEm], e_0 = k[kE0];
  const C o_x = k[kOx], o_m = k[kOm], o_0 = k[kO0], o_e = k[kOe], o_p = k[kOp], o_z = k[kOz];
  const C d_x = k[kDx], d_0 = k[kD0];
  const C w = p.guidance_scale;
  const C lo = std::isfinite(p.clip) ? C(-p.clip) : -std::numeric_limits<C>::infinity();
  const C hi = -lo;
  const bool cfg = p.uncond != nullptr;
  at::parallel_for(0, p.numel, 16 * kTile, [&](int64_t begin, int64_t end) {
    C x[kTile], m[kTile], u[kTile], z[kTile], pr[kTile];
    T out[kTile], den[kTile];
    for (int64_t t0 = begin; t0 < end;) {
      const int64_t sample_end = (t0 / p.per_sample + 1) * p.per_sample;
      const int64_t n = std::min({kTile, end - t0, sample_end - t0});
      const C scale = p.rescale ? static_cast<const C*>(p.rescale)[t0 / p.per_sample] : C(1);
      load_tile<T>(p.x, t0, n, x);
      load_tile<T>(p.model_output, t0, n, m);
      load_tile<T>(p.uncond, t0, n, u);
      load_tile<T>(p.noise, t0, n, z);
      load_tile<T>(p.prev_x0, t0, n, pr);
      for (int64_t j = 0; j < n; ++j) {
        const C mv = (cfg ? u[j] + w * (m[j] - u[j]) : m[j]) * scale;
        const C xt = x[j] + k_churn * z[j];
        const C x0 = std::min(std::max(a_x * xt + a_m * mv, lo), hi);
        const C eps = e_x * xt + e_m * mv + e_0 * x0;
        out[j] = static_cast<T>(o_x * xt + o_m * mv + o_0 * x0 + o_e * eps + o_p * pr[j] + o_z * z[j]);
        den[j] = static_cast<T>(d_x * xt + d_0 * x0);
      }
      std::copy(out, out + n, static_cast<T*>(p.out) + t0);
      if (p.x0_out) std::copy(den, den + n, static_cast<T*>(p.x0_out) + t0);
      t0 += n;
    }
  });
}

template <typename T>
void rescale_cpu(const RescaleParams& p) {
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* c = static_cast<const T*>(p.cond) + b * p.per_sample;
      const T* u = static_cast<const T*>(p.uncond) + b * p.per_sample;
      double s[4] = {0, 0, 0, 0};
      for (int64_t i = 0; i < p.per_sample; ++i) {
        const double cv = static_cast<double>(c[i]), uv = static_cast<double>(u[i]);
        const double g = uv + p.guidance_scale * (cv - uv);
        s[0] += cv; s[1] += cv * cv; s[2] += g; s[3] += g * g;
      }
      const double n = static_cast<double>(p.per_sample);
      const double var_c = std::max((s[1] - s[0] * s[0] / n) / (n - 1), 0.0);
      const double var_g = std::max((s[3] - s[2] * s[2] / n) / (n - 1), 0.0);
      static_cast<at::opmath_type<T>*>(p.factor)[b] =
          static_cast<at::opmath_type<T>>(p.guidance_rescale * std::sqrt(var_c / var_g) + (1.0 - p.guidance_rescale));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(
    const at::Tensor& x, const at::Tensor& model_output, const c10::optional<at::Tensor>& uncond,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& prev_x0,
    const c10::optional<at::Tensor>& cfg_rescale, c10::ArrayRef<double> coeffs, double guidance_scale,
    double clip_x0, bool return_x0) {
  PreparedStep s = prepare_step(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs,
                                guidance_scale, clip_x0, return_x0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fewstep::sampler_step",
                                  [&] { step_cpu<scalar_t>(s.params); });
  return {s.out, s.x0_out};
}

at::Tensor cfg_rescale_factor_cpu(const at::Tensor& model_output, const at::Tensor& uncond,
                                  double guidance_scale, double guidance_rescale) {
  PreparedRescale s = prepare_rescale(model_output, uncond, guidance_scale, guidance_rescale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(),
                                  "fewstep::cfg_rescale_factor", [&] { rescale_cpu<scalar_t>(s.params); });
  return s.factor;
}

}  // namespace
}  // namespace sampler_step
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.ops.sampler_step");
  m.def(
      "sampler_step(Tensor x, Tensor model_output, Tensor? uncond, Tensor? noise, "
      "Tensor? prev_x0, Tensor? cfg_rescale, float[] coeffs, float guidance_scale, float clip_x0, "
      "bool return_x0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "cfg_rescale_factor(Tensor cond, Tensor uncond, float guidance_scale, "
      "float guidance_rescale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) {
  m.impl("sampler_step", &fewstep::sampler_step::sampler_step_cpu);
  m.impl("cfg_rescale_factor", &fewstep::sampler_step::cfg_rescale_factor_cpu);
}
