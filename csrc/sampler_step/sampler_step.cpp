// Fused sampler step: op schemas, shared torch glue and the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <cmath>

#include "fewstep/checks.h"
#include "sampler_step/sampler_step_torch.h"

namespace fewstep {
namespace sampler_step {

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
  p.dtype = to_dtype(x.scalar_type(), "x");
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
  p.dtype = to_dtype(model_output.scalar_type(), "cond");
  return s;
}

namespace {

// CPU kernel: tiles of kTile elements that never straddle a sample, so each tile has one
// rescale factor. float and double tiles are read and written in place; fp16/bf16 tiles are
// converted to float first. Absent inputs read as a tile of zeros, so the arithmetic is one
// straight-line loop over restrict pointers that the compiler vectorizes.
constexpr int64_t kTile = 512;

// The step with eps folded into the output's coefficients (out = c_xt xt + c_m m + c_0 x0 + ...):
// three multiply-adds fewer per element, which is what bounds this loop on a CPU core.
template <typename C>
struct Folded {
  C churn, a_x, a_m, c_xt, c_m, c_0, o_p, o_z, d_x, d_0, clip;
  explicit Folded(const StepParams& p)
      : churn(p.coeffs[kChurn]), a_x(p.coeffs[kAx]), a_m(p.coeffs[kAm]),
        c_xt(p.coeffs[kOx] + p.coeffs[kOe] * p.coeffs[kEx]), c_m(p.coeffs[kOm] + p.coeffs[kOe] * p.coeffs[kEm]),
        c_0(p.coeffs[kO0] + p.coeffs[kOe] * p.coeffs[kE0]), o_p(p.coeffs[kOp]), o_z(p.coeffs[kOz]),
        d_x(p.coeffs[kDx]), d_0(p.coeffs[kD0]), clip(std::isfinite(p.clip) ? p.clip : 0) {}
};

template <bool kClip, typename C>
void affine_tile(const C* __restrict x, const C* __restrict m, const C* __restrict z, const C* __restrict pr,
                 C* __restrict out, C* __restrict den, int64_t n, const Folded<C> k) {
  for (int64_t j = 0; j < n; ++j) {
    const C xt = x[j] + k.churn * z[j];
    C x0 = k.a_x * xt + k.a_m * m[j];
    if constexpr (kClip) {  // keeps NaN, as torch.clamp
      x0 = x0 < -k.clip ? -k.clip : x0;
      x0 = x0 > k.clip ? k.clip : x0;
    }
    out[j] = k.c_xt * xt + k.c_m * m[j] + k.c_0 * x0 + k.o_p * pr[j] + k.o_z * z[j];
    den[j] = k.d_x * xt + k.d_0 * x0;
  }
}

// A tile of `base` as compute-type values: in place when T is the compute type, else converted.
template <typename T, typename C>
const C* tile_view(const void* base, int64_t begin, int64_t n, C* scratch, const C* zeros) {
  if (base == nullptr) return zeros;
  const T* src = static_cast<const T*>(base) + begin;
  if constexpr (std::is_same_v<T, C>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<C>(src[j]);
    return scratch;
  }
}

template <typename T>
void step_cpu(const StepParams& p) {
  using C = at::opmath_type<T>;
  constexpr bool kInPlace = std::is_same_v<T, C>;
  const Folded<C> k(p);
  const bool clip = std::isfinite(p.clip);
  const C w = p.guidance_scale;
  at::parallel_for(0, p.numel, 16 * kTile, [&](int64_t begin, int64_t end) {
    C zeros[kTile] = {};
    C xs[kTile], ms[kTile], us[kTile], zs[kTile], ps[kTile], guided[kTile], outs[kTile], dens[kTile];
    for (int64_t t0 = begin; t0 < end;) {
      const int64_t sample_end = (t0 / p.per_sample + 1) * p.per_sample;
      const int64_t n = std::min({kTile, end - t0, sample_end - t0});
      const C scale = p.rescale ? static_cast<const C*>(p.rescale)[t0 / p.per_sample] : C(1);
      const C* x = tile_view<T>(p.x, t0, n, xs, zeros);
      const C* m = tile_view<T>(p.model_output, t0, n, ms, zeros);
      const C* z = tile_view<T>(p.noise, t0, n, zs, zeros);
      const C* pr = tile_view<T>(p.prev_x0, t0, n, ps, zeros);
      if (p.uncond != nullptr || scale != C(1)) {
        const C* u = tile_view<T>(p.uncond, t0, n, us, zeros);
        if (p.uncond != nullptr) {
          for (int64_t j = 0; j < n; ++j) guided[j] = (u[j] + w * (m[j] - u[j])) * scale;
        } else {
          for (int64_t j = 0; j < n; ++j) guided[j] = m[j] * scale;
        }
        m = guided;
      }
      C* out = outs;
      C* den = dens;
      if constexpr (kInPlace) {
        out = static_cast<C*>(p.out) + t0;
        if (p.x0_out) den = static_cast<C*>(p.x0_out) + t0;
      }
      if (clip) {
        affine_tile<true>(x, m, z, pr, out, den, n, k);
      } else {
        affine_tile<false>(x, m, z, pr, out, den, n, k);
      }
      if constexpr (!kInPlace) {
        T* dst = static_cast<T*>(p.out) + t0;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(outs[j]);
        if (p.x0_out) {
          T* dst0 = static_cast<T*>(p.x0_out) + t0;
          for (int64_t j = 0; j < n; ++j) dst0[j] = static_cast<T>(dens[j]);
        }
      }
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
