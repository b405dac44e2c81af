// DMD generator loss: op schemas, argument checks and the CPU kernels.
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

template <typename T>
typename Compute<T>::type g_at(const Params& p, int64_t i, typename Compute<T>::type norm) {
  using C = typename Compute<T>::type;
  const C g = (static_cast<C>(static_cast<const T*>(p.fake)[i]) - real_at<T>(p, i)) / norm;
  return std::isfinite(g) ? g : C(0);  // norm 0 gives inf or nan
}

// Runs f(b, begin, end) for every chunk of every sample, in parallel.
template <class F>
void for_each_chunk(const Params& p, F&& f) {
  at::parallel_for(0, p.batch * p.chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.chunks, c = t % p.chunks;
      f(t, b, b * p.per_sample + c * kChunk, b * p.per_sample + std::min(p.per_sample, (c + 1) * kChunk));
    }
  });
}

// The CUDA kernels' chunks, with each chunk summed sequentially in fp64: deterministic.
template <typename T>
void forward_kernel(const Params& p) {
  using C = typename Compute<T>::type;
  const T* x = static_cast<const T*>(p.x);
  for_each_chunk(p, [&](int64_t t, int64_t, int64_t begin, int64_t end) {
    double acc = 0;
    for (int64_t i = begin; i < end; ++i) acc += std::abs(static_cast<C>(x[i]) - real_at<T>(p, i));
    p.norm_partials[t] = acc;
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    double s = 0;
    for (int64_t k = 0; k < p.chunks; ++k) s += p.norm_partials[b * p.chunks + k];
    p.norm[b] = s / static_cast<double>(p.per_sample);
  }
  for_each_chunk(p, [&](int64_t t, int64_t b, int64_t begin, int64_t end) {
    const C norm = static_cast<C>(p.norm[b]);
    double acc = 0;
    for (int64_t i = begin; i < end; ++i) {
      const C g = g_at<T>(p, i, norm);
      acc += static_cast<double>(g) * g;
    }
    p.loss_partials[t] = acc;
  });
  double total = 0;
  for (int64_t t = 0; t < p.batch * p.chunks; ++t) total += p.loss_partials[t];
  const double loss = 0.5 * total / static_cast<double>(p.batch * p.per_sample);
  if (p.dtype == DType::kFloat64) *static_cast<double*>(p.loss) = loss;
  else *static_cast<float*>(p.loss) = static_cast<float>(loss);
}

template <typename T>
void backward_kernel(const Params& p) {
  using C = typename Compute<T>::type;
  const double upstream = p.dtype == DType::kFloat64 ? *static_cast<const double*>(p.grad_loss)
                                                     : *static_cast<const float*>(p.grad_loss);
  const C scale = static_cast<C>(upstream / static_cast<double>(p.batch * p.per_sample));
  T* grad = static_cast<T*>(p.grad);
  for_each_chunk(p, [&](int64_t, int64_t b, int64_t begin, int64_t end) {
    const C norm = static_cast<C>(p.norm[b]);
    for (int64_t i = begin; i < end; ++i) grad[i] = static_cast<T>(g_at<T>(p, i, norm) * scale);
  });
}

template <template <typename> class K>
void run_for_dtype(const Params& p) {
  switch (p.dtype) {
    case DType::kFloat16: return K<c10::Half>::run(p);
    case DType::kBFloat16: return K<c10::BFloat16>::run(p);
    case DType::kFloat64: return K<double>::run(p);
    default: return K<float>::run(p);
  }
}
template <typename T> struct Forward { static void run(const Params& p) { forward_kernel<T>(p); } };
template <typename T> struct Backward { static void run(const Params& p) { backward_kernel<T>(p); } };

std::tuple<at::Tensor, at::Tensor> dmd_loss_cpu(const at::Tensor& x, const at::Tensor& real,
                                                const c10::optional<at::Tensor>& uncond, double guidance_scale,
                                                const at::Tensor& fake) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor for the CPU kernel, got ", x.device());
  Prepared s = prepare_forward(x, real, uncond, guidance_scale, fake);
  run_for_dtype<Forward>(s.params);
  return {s.loss, s.norm};
}

at::Tensor dmd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& real,
                                 const c10::optional<at::Tensor>& uncond, double guidance_scale,
                                 const at::Tensor& fake, const at::Tensor& norm) {
  TORCH_CHECK_VALUE(fake.device().is_cpu(), "fake: expected a CPU tensor for the CPU kernel, got ", fake.device());
  Prepared s = prepare_backward(grad_loss, real, uncond, guidance_scale, fake, norm);
  run_for_dtype<Backward>(s.params);
  return s.grad;
}

// Checks shared by both directions; fills the inputs and sizes of `s`.
void prepare_inputs(Prepared& s, const at::Tensor& ref, const char* ref_name, const at::Tensor& real,
                    const c10::optional<at::Tensor>& uncond, double guidance_scale, const at::Tensor& fake) {
  check_float_tensor(ref, ref_name);
  TORCH_CHECK_VALUE(ref.dim() >= 2, ref_name, ": expected a batch of samples [B, ...] with at least 2 dims, got shape ",
                    ref.sizes());
  check_like(real, "real", ref, ref_name);
  check_like(uncond, "real_uncond", ref, ref_name);
  check_like(fake, "fake", ref, ref_name);
  check_finite(guidance_scale, "guidance_scale");
  TORCH_CHECK_VALUE(ref.size(0) <= 65535, ref_name, ": expected at most 65535 samples (the CUDA grid's y size), ",
                    "got shape ", ref.sizes());
  s.real = real.contiguous();
  s.fake = fake.contiguous();
  if (uncond.has_value()) s.uncond = uncond->contiguous();
  Params& p = s.params;
  p.batch = ref.size(0);
  p.per_sample = ref.numel() / p.batch;
  p.chunks = num_chunks(p.per_sample);
  p.dtype = to_dtype(ref.scalar_type(), ref_name);
  p.guidance_scale = guidance_scale;
  p.real = s.real.const_data_ptr();
  p.uncond = s.uncond.defined() ? s.uncond.const_data_ptr() : nullptr;
  p.fake = s.fake.const_data_ptr();
}

at::ScalarType loss_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

Prepared prepare_forward(const at::Tensor& x, const at::Tensor& real, const c10::optional<at::Tensor>& uncond,
                         double guidance_scale, const at::Tensor& fake) {
  Prepared s;
  prepare_inputs(s, x, "x", real, uncond, guidance_scale, fake);
  Params& p = s.params;
  s.x = x.contiguous();
  s.loss = at::empty({}, x.options().dtype(loss_dtype(x.scalar_type())));
  s.norm = at::empty({p.batch}, x.options().dtype(at::kDouble));
  s.norm_partials = at::empty({p.batch * p.chunks}, x.options().dtype(at::kDouble));
  s.loss_partials = at::empty({p.batch * p.chunks}, x.options().dtype(at::kDouble));
  p.x = s.x.const_data_ptr();
  p.grad = nullptr;
  p.grad_loss = nullptr;
  p.norm_partials = s.norm_partials.mutable_data_ptr<double>();
  p.loss_partials = s.loss_partials.mutable_data_ptr<double>();
  p.loss = s.loss.mutable_data_ptr();
  p.norm = s.norm.mutable_data_ptr<double>();
  return s;
}

Prepared prepare_backward(const at::Tensor& grad_loss, const at::Tensor& real,
                          const c10::optional<at::Tensor>& uncond, double guidance_scale, const at::Tensor& fake,
                          const at::Tensor& norm) {
  Prepared s;
  prepare_inputs(s, fake, "fake", real, uncond, guidance_scale, fake);
  Params& p = s.params;
  const auto want = loss_dtype(fake.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.dim() == 0 && grad_loss.device() == fake.device(), "grad_loss: expected a 0-dim tensor on ",
                    fake.device(), ", got shape ", grad_loss.sizes(), " on ", grad_loss.device());
  TORCH_CHECK_TYPE(grad_loss.scalar_type() == want, "grad_loss: expected dtype ", dtype_name(want), ", got ",
                   dtype_name(grad_loss.scalar_type()));
  TORCH_CHECK_VALUE(norm.dim() == 1 && norm.size(0) == p.batch && norm.device() == fake.device() &&
                        norm.scalar_type() == at::kDouble && norm.is_contiguous(),
                    "norm: expected the forward's torch.float64 norms of shape [", p.batch, "] on ", fake.device(),
                    ", got ", dtype_name(norm.scalar_type()), " of shape ", norm.sizes(), " on ", norm.device());
  s.grad = at::empty_like(s.fake);
  s.norm = norm;
  s.grad_loss = grad_loss.contiguous();
  p.x = nullptr;
  p.grad = s.grad.mutable_data_ptr();
  p.grad_loss = s.grad_loss.const_data_ptr();
  p.norm = s.norm.mutable_data_ptr<double>();
  p.norm_partials = p.loss_partials = nullptr;
  p.loss = nullptr;
  return s;
}

}  // namespace dmd_loss
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.losses.dmd");
  m.def("dmd_loss(Tensor x, Tensor real, Tensor? real_uncond, float guidance_scale, Tensor fake) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("dmd_loss_backward(Tensor grad_loss, Tensor real, Tensor? real_uncond, float guidance_scale, Tensor fake, "
        "Tensor norm) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) {
  m.impl("dmd_loss", &fewstep::dmd_loss::dmd_loss_cpu);
  m.impl("dmd_loss_backward", &fewstep::dmd_loss::dmd_loss_backward_cpu);
}
