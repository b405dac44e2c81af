// DMD generator loss: op schema, argument checks and the CPU kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>

#include "dmd_loss/dmd_loss_torch.h"
#include "fewstep/checks.h"

namespace fewstep {
namespace dmd_loss {
namespace {

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename T>
typename Compute<T>::type real_at(const Params& p, int64_t i) {
  using C = typename Compute<T>::type;
  const C r = static_cast<C>(static_cast<const T*>(p.real)[i]);
  if (p.uncond == nullptr) return r;
  const C u = static_cast<C>(static_cast<const T*>(p.uncond)[i]);
  return u + static_cast<C>(p.guidance_scale) * (r - u);
}

// Same chunks and summation order as the CUDA kernels' partials (within a chunk the CPU sums
// sequentially), so both are deterministic.
template <typename T>
void dmd_loss_kernel(const Params& p) {
  using C = typename Compute<T>::type;
  const T* x = static_cast<const T*>(p.x);
  const T* fake = static_cast<const T*>(p.fake);
  T* grad = static_cast<T*>(p.grad);
  const int64_t tasks = p.batch * p.chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.chunks, c = t % p.chunks;
      const int64_t begin = b * p.per_sample + c * kChunk;
      const int64_t end = b * p.per_sample + std::min(p.per_sample, (c + 1) * kChunk);
      double acc = 0;  // sums in fp64: more accurate than PyTorch's fp32 sums, and memory-bound anyway
      for (int64_t i = begin; i < end; ++i) acc += std::abs(static_cast<C>(x[i]) - real_at<T>(p, i));
      p.norm_partials[t] = acc;
    }
  });
  const C scale = static_cast<C>(1.0 / static_cast<double>(p.batch * p.per_sample));
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.chunks, c = t % p.chunks;
      double s = 0;
      for (int64_t k = 0; k < p.chunks; ++k) s += p.norm_partials[b * p.chunks + k];
      const C norm = static_cast<C>(s / static_cast<double>(p.per_sample));  // 0: g is inf or nan, then 0
      const int64_t begin = b * p.per_sample + c * kChunk;
      const int64_t end = b * p.per_sample + std::min(p.per_sample, (c + 1) * kChunk);
      double acc = 0;  // sums in fp64: more accurate than PyTorch's fp32 sums, and memory-bound anyway
      for (int64_t i = begin; i < end; ++i) {
        C g = (static_cast<C>(fake[i]) - real_at<T>(p, i)) / norm;
        if (!std::isfinite(g)) g = 0;
        grad[i] = static_cast<T>(g * scale);
        acc += static_cast<double>(g) * g;
      }
      p.loss_partials[t] = acc;
    }
  });
  double total = 0;
  for (int64_t t = 0; t < tasks; ++t) total += p.loss_partials[t];
  const double loss = 0.5 * total / static_cast<double>(p.batch * p.per_sample);
  if (p.dtype == DType::kFloat64) *static_cast<double*>(p.loss) = loss;
  else *static_cast<float*>(p.loss) = static_cast<float>(loss);
}

std::tuple<at::Tensor, at::Tensor> dmd_loss_cpu(const at::Tensor& x, const at::Tensor& real,
                                                const c10::optional<at::Tensor>& uncond, double guidance_scale,
                                                const at::Tensor& fake) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor for the CPU kernel, got ", x.device());
  Prepared s = prepare(x, real, uncond, guidance_scale, fake);
  switch (s.params.dtype) {
    case DType::kFloat16: dmd_loss_kernel<c10::Half>(s.params); break;
    case DType::kBFloat16: dmd_loss_kernel<c10::BFloat16>(s.params); break;
    case DType::kFloat64: dmd_loss_kernel<double>(s.params); break;
    default: dmd_loss_kernel<float>(s.params);
  }
  return {s.loss, s.grad};
}

}  // namespace

Prepared prepare(const at::Tensor& x, const at::Tensor& real, const c10::optional<at::Tensor>& uncond,
                 double guidance_scale, const at::Tensor& fake) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected a batch of samples [B, ...] with at least 2 dims, got shape ",
                    x.sizes());
  check_like(real, "real", x, "x");
  check_like(uncond, "real_uncond", x, "x");
  check_like(fake, "fake", x, "x");
  check_finite(guidance_scale, "guidance_scale");
  Prepared s;
  s.x = x.contiguous();
  s.real = real.contiguous();
  s.fake = fake.contiguous();
  if (uncond.has_value()) s.uncond = uncond->contiguous();
  const auto dt = x.scalar_type();
  s.loss = at::empty({}, x.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  s.grad = at::empty_like(s.x);
  Params& p = s.params;
  p.batch = x.size(0);
  p.per_sample = x.numel() / p.batch;
  p.chunks = num_chunks(p.per_sample);
  TORCH_CHECK_VALUE(p.batch <= 65535, "x: expected at most 65535 samples (the CUDA grid's y size), got shape ",
                    x.sizes());
  s.norm_partials = at::empty({p.batch * p.chunks}, x.options().dtype(at::kDouble));
  s.loss_partials = at::empty({p.batch * p.chunks}, x.options().dtype(at::kDouble));
  p.x = s.x.const_data_ptr();
  p.real = s.real.const_data_ptr();
  p.uncond = s.uncond.defined() ? s.uncond.const_data_ptr() : nullptr;
  p.fake = s.fake.const_data_ptr();
  p.grad = s.grad.mutable_data_ptr();
  p.dtype = dt == at::kHalf ? DType::kFloat16 : dt == at::kBFloat16 ? DType::kBFloat16
          : dt == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  p.guidance_scale = guidance_scale;
  p.norm_partials = s.norm_partials.mutable_data_ptr<double>();
  p.loss_partials = s.loss_partials.mutable_data_ptr<double>();
  p.loss = s.loss.mutable_data_ptr();
  return s;
}

}  // namespace dmd_loss
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.losses.dmd");
  m.def("dmd_loss(Tensor x, Tensor real, Tensor? real_uncond, float guidance_scale, Tensor fake) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) { m.impl("dmd_loss", &fewstep::dmd_loss::dmd_loss_cpu); }
