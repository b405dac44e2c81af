// Distillation losses besides DMD: op schemas, argument checks and the CPU kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "distill_losses/distill_losses_torch.h"
#include "fewstep/checks.h"

namespace fewstep {
namespace distill_losses {
namespace {

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

// Calls f(T{}) with T the element type of `dtype`.
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
    case DType::kFloat64: return f(double{});
    default: return f(float{});
  }
}

template <typename T>
typename Compute<T>::type load(const void* data, int64_t i) {
  return static_cast<typename Compute<T>::type>(static_cast<const T*>(data)[i]);
}

void write_loss(void* loss, DType dtype, double value) {
  if (dtype == DType::kFloat64) *static_cast<double*>(loss) = value;
  else *static_cast<float*>(loss) = static_cast<float>(value);
}

double read_grad_loss(const void* grad_loss, DType dtype) {
  return dtype == DType::kFloat64 ? *static_cast<const double*>(grad_loss) : *static_cast<const float*>(grad_loss);
}

// Runs f(task, begin, end) over `chunks` chunks of kChunk elements of each of `rows` rows of
// `row_size` elements, in parallel (task = row * chunks + chunk).
template <class F>
void for_each_chunk(int64_t rows, int64_t chunks, int64_t row_size, F&& f) {
  at::parallel_for(0, rows * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c = t % chunks;
      f(t, r * row_size + c * kChunk, r * row_size + std::min(row_size, (c + 1) * kChunk));
    }
  });
}

// The elementwise difference e = u - v (distill_losses.h), in the compute type.
template <typename T>
struct Difference {
  using C = typename Compute<T>::type;
  const RegressionParams& p;
  ConsistencyFormIn<C> u, v;

  Difference(const RegressionParams& params, const SampleCoefficients& k) : p(params), u(k.a), v(k.c) {}

  C operator()(int64_t i) const {
    if (!p.lcd) return load<T>(p.a, i) - load<T>(p.c, i);
    return u(load<T>(p.a, i), load<T>(p.b, i)) - v(load<T>(p.c, i), load<T>(p.d, i));
  }
};

template <typename T>
void regression_forward(const RegressionParams& p) {
  using C = typename Compute<T>::type;
  const C huber_c = static_cast<C>(p.huber_c);
  for_each_chunk(p.batch, p.chunks, p.per_sample, [&](int64_t task, int64_t begin, int64_t end) {
    const Difference<T> diff(p, sample_coefficients(p, task / p.chunks));
    double acc = 0;
    for (int64_t i = begin; i < end; ++i) acc += distance(p.distance, diff(i), huber_c);
    p.partials[task] = acc;
  });
  double total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    double s = 0;
    for (int64_t k = 0; k < p.chunks; ++k) s += p.partials[b * p.chunks + k];
    p.sample_means[b] = s / static_cast<double>(p.per_sample);
    total += (p.weight.data != nullptr ? p.weight.at(b) : 1.0) * p.sample_means[b];
  }
  write_loss(p.loss, p.dtype, total / static_cast<double>(p.batch));
}

template <typename T>
void regression_backward(const RegressionParams& p) {
  using C = typename Compute<T>::type;
  const C huber_c = static_cast<C>(p.huber_c);
  const double scale = read_grad_loss(p.grad_loss, p.dtype) / static_cast<double>(p.batch * p.per_sample);
  T* grad = static_cast<T*>(p.grad);
  for_each_chunk(p.batch, p.chunks, p.per_sample, [&](int64_t task, int64_t begin, int64_t end) {
    const int64_t b = task / p.chunks;
    const SampleCoefficients k = sample_coefficients(p, b);
    const Difference<T> diff(p, k);
    const C factor = static_cast<C>(scale * (p.weight.data != nullptr ? p.weight.at(b) : 1.0) * k.grad);
    for (int64_t i = begin; i < end; ++i) {
      grad[i] = static_cast<T>(factor * distance_derivative(p.distance, diff(i), huber_c));
    }
  });
}

template <typename T>
void teacher_step(const TeacherStepParams& p) {
  using C = typename Compute<T>::type;
  T* out = static_cast<T*>(p.out);
  for_each_chunk(p.batch, p.chunks, p.per_sample, [&](int64_t task, int64_t begin, int64_t end) {
    const TeacherCoefficients k = teacher_coefficients(p, task / p.chunks);
    const C kx = static_cast<C>(k.x), kc = static_cast<C>(k.cond), ku = static_cast<C>(k.uncond);
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<T>(kx * load<T>(p.x_t, i) + kc * load<T>(p.cond, i) + ku * load<T>(p.uncond, i));
    }
  });
}

template <typename T>
void gan_forward(const GanParams& p) {
  using C = typename Compute<T>::type;
  const int64_t tasks = p.real_chunks + p.fake_chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const bool real = t < p.real_chunks;
      const int64_t c = real ? t : t - p.real_chunks, numel = real ? p.real_numel : p.fake_numel;
      const void* logits = real ? p.real : p.fake;
      const C sign = static_cast<C>(real ? -1.0 : p.fake_sign);
      double acc = 0;
      for (int64_t i = c * kChunk; i < std::min(numel, (c + 1) * kChunk); ++i) acc += softplus(sign * load<T>(logits, i));
      p.partials[t] = acc;
    }
  });
  double real_sum = 0, fake_sum = 0;
  for (int64_t t = 0; t < p.real_chunks; ++t) real_sum += p.partials[t];
  for (int64_t t = p.real_chunks; t < tasks; ++t) fake_sum += p.partials[t];
  const double loss = (p.real_chunks > 0 ? real_sum / static_cast<double>(p.real_numel) : 0.0) +
                      fake_sum / static_cast<double>(p.fake_numel);
  write_loss(p.loss, p.dtype, loss);
}

template <typename T>
void softplus_backward(const SoftplusBackwardParams& p) {
  using C = typename Compute<T>::type;
  const C scale = static_cast<C>(read_grad_loss(p.grad_loss, p.dtype) * p.sign / static_cast<double>(p.numel));
  const C sign = static_cast<C>(p.sign);
  T* grad = static_cast<T*>(p.grad);
  for_each_chunk(1, p.chunks, p.numel, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) grad[i] = static_cast<T>(scale * sigmoid(sign * load<T>(p.logits, i)));
  });
}

// ---- checks and params ----

at::ScalarType loss_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

void check_positive(double v, const char* name) {
  check_finite(v, name);
  TORCH_CHECK_VALUE(v > 0, name, ": expected a positive number, got ", double_repr(v));
}

void check_batch(const at::Tensor& t, const char* name) {
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.dim() >= 1, name, ": expected a batch of samples [B, ...], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) <= 65535, name, ": expected at most 65535 samples (the CUDA grid's y size), got shape ",
                    t.sizes());
}

Prediction parse_prediction(const std::string& prediction) {
  if (prediction == "eps") return Prediction::kEps;
  if (prediction == "x0") return Prediction::kX0;
  TORCH_CHECK_VALUE(prediction == "v", "prediction: expected one of ['eps', 'x0', 'v'], got '", prediction, "'");
  return Prediction::kV;
}

Distance parse_loss(const std::string& loss) {
  if (loss == "huber") return Distance::kPseudoHuber;
  TORCH_CHECK_VALUE(loss == "l2", "loss: expected one of ['huber', 'l2'], got '", loss, "'");
  return Distance::kSquare;
}

// A small vector as the kernels read it: float32 or float64, contiguous (other floats are cast).
Vector to_vector(Prepared& s, const at::Tensor& t) {
  at::Tensor v = t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat);
  s.keep.push_back(v);
  return {v.const_data_ptr(), v.scalar_type() == at::kDouble, v.numel()};
}

// A [B] vector on ref's device: int64 timesteps (`floating` false) or any float dtype.
void check_per_sample(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                      bool floating, const char* what) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got an undefined tensor");
  if (floating) {
    check_float_tensor(t, name);
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, ": expected dtype in ['torch.int64'], got ",
                     dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.numel() > 0, name, ": expected a non-empty tensor, got shape ", t.sizes());
  }
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == ref.size(0), name, ": expected shape [", ref.size(0), "] (", what,
                    " per sample of ", ref_name, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ",
                    ref_name, "), got ", t.device());
}

LcdSchedule prepare_schedule(Prepared& s, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                             const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                             const std::string& prediction) {
  check_per_sample(t, "t", ref, ref_name, false, "one timestep");
  check_per_sample(t_prev, "t_prev", ref, ref_name, false, "one timestep");
  check_float_tensor(alphas_cumprod, "alphas_cumprod");
  TORCH_CHECK_VALUE(alphas_cumprod.dim() == 1, "alphas_cumprod: expected a 1-D table indexed by timestep, got shape ",
                    alphas_cumprod.sizes());
  TORCH_CHECK_VALUE(alphas_cumprod.device() == ref.device(), "alphas_cumprod: expected device ", ref.device(),
                    " (the device of ", ref_name, "), got ", alphas_cumprod.device());
  LcdSchedule schedule;
  schedule.prediction = parse_prediction(prediction);
  const at::Tensor tc = t.contiguous(), tpc = t_prev.contiguous();
  s.keep.push_back(tc);
  s.keep.push_back(tpc);
  schedule.t = tc.const_data_ptr<int64_t>();
  schedule.t_prev = tpc.const_data_ptr<int64_t>();
  schedule.alphas_cumprod = to_vector(s, alphas_cumprod);
  schedule.sigma_data = 0.5;
  schedule.timestep_scaling = 10.0;
  return schedule;
}

const void* keep_contiguous(Prepared& s, const at::Tensor& t) {
  s.keep.push_back(t.contiguous());
  return s.keep.back().const_data_ptr();
}

// Sizes, outputs and the forward/backward pointers of a regression loss over `ref`'s samples;
// `batched` false treats the whole tensor as one sample.
void finish_regression(PreparedRegression& s, const at::Tensor& grad_loss, const at::Tensor& ref, bool batched) {
  RegressionParams& p = s.params;
  p.dtype = to_dtype(ref.scalar_type(), "pred");
  p.batch = batched ? ref.size(0) : 1;
  p.per_sample = ref.numel() / p.batch;
  p.chunks = num_chunks(p.per_sample);
  p.partials = p.sample_means = nullptr;
  p.loss = p.grad = nullptr;
  p.grad_loss = nullptr;
  if (grad_loss.defined()) {
    const auto want = loss_dtype(ref.scalar_type());
    TORCH_CHECK_VALUE(grad_loss.dim() == 0 && grad_loss.device() == ref.device(), "grad_loss: expected a 0-dim tensor on ",
                      ref.device(), ", got shape ", grad_loss.sizes(), " on ", grad_loss.device());
    TORCH_CHECK_TYPE(grad_loss.scalar_type() == want, "grad_loss: expected dtype ", dtype_name(want), ", got ",
                     dtype_name(grad_loss.scalar_type()));
    p.grad_loss = keep_contiguous(s, grad_loss);
    s.out = at::empty(ref.sizes(), ref.options());
    p.grad = s.out.mutable_data_ptr();
    return;
  }
  s.out = at::empty({}, ref.options().dtype(loss_dtype(ref.scalar_type())));
  s.sample_means = at::empty({p.batch}, ref.options().dtype(at::kDouble));
  at::Tensor partials = at::empty({p.batch * p.chunks}, ref.options().dtype(at::kDouble));
  s.keep.push_back(partials);
  p.loss = s.out.mutable_data_ptr();
  p.sample_means = s.sample_means.mutable_data_ptr<double>();
  p.partials = partials.mutable_data_ptr<double>();
}

}  // namespace

PreparedRegression prepare_pseudo_huber(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                                        double c) {
  check_float_tensor(pred, "pred");
  check_like(target, "target", pred, "pred");
  check_positive(c, "c");
  PreparedRegression s;
  RegressionParams& p = s.params;
  p.a = keep_contiguous(s, pred);
  p.c = keep_contiguous(s, target);
  p.b = p.d = nullptr;
  p.distance = Distance::kPseudoHuber;
  p.huber_c = c;
  p.weight = Vector{};
  p.lcd = false;
  p.schedule = LcdSchedule{};
  finish_regression(s, grad_loss, pred, false);
  return s;
}

PreparedRegression prepare_denoising(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& weight) {
  check_batch(pred, "pred");
  check_like(target, "target", pred, "pred");
  PreparedRegression s;
  RegressionParams& p = s.params;
  p.weight = Vector{};
  if (weight.has_value()) {
    check_per_sample(*weight, "weight", pred, "pred", true, "one weight");
    p.weight = to_vector(s, *weight);
  }
  p.a = keep_contiguous(s, pred);
  p.c = keep_contiguous(s, target);
  p.b = p.d = nullptr;
  p.distance = Distance::kSquare;
  p.huber_c = 0;
  p.lcd = false;
  p.schedule = LcdSchedule{};
  finish_regression(s, grad_loss, pred, true);
  return s;
}

PreparedRegression prepare_lcd(const at::Tensor& grad_loss, const at::Tensor& student_out, const at::Tensor& x_t,
                               const at::Tensor& t, const at::Tensor& target_out, const at::Tensor& x_prev,
                               const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                               const std::string& prediction, const std::string& loss, double huber_c,
                               double sigma_data, double timestep_scaling) {
  check_batch(student_out, "student_out");
  check_like(x_t, "x_t", student_out, "student_out");
  check_like(target_out, "target_out", student_out, "student_out");
  check_like(x_prev, "x_prev", student_out, "student_out");
  PreparedRegression s;
  RegressionParams& p = s.params;
  p.schedule = prepare_schedule(s, student_out, "student_out", t, t_prev, alphas_cumprod, prediction);
  p.distance = parse_loss(loss);
  check_positive(huber_c, "huber_c");
  check_positive(sigma_data, "sigma_data");
  check_finite(timestep_scaling, "timestep_scaling");
  p.schedule.sigma_data = sigma_data;
  p.schedule.timestep_scaling = timestep_scaling;
  p.huber_c = huber_c;
  p.weight = Vector{};
  p.lcd = true;
  p.a = keep_contiguous(s, x_t);
  p.b = keep_contiguous(s, student_out);
  p.c = keep_contiguous(s, x_prev);
  p.d = keep_contiguous(s, target_out);
  finish_regression(s, grad_loss, student_out, true);
  return s;
}

PreparedTeacherStep prepare_teacher_step(const at::Tensor& x_t, const at::Tensor& cond_out,
                                         const at::Tensor& uncond_out, const at::Tensor& t, const at::Tensor& t_prev,
                                         double guidance_scale, const c10::optional<at::Tensor>& guidance_scales,
                                         const at::Tensor& alphas_cumprod, const std::string& prediction) {
  check_batch(x_t, "x_t");
  check_like(cond_out, "cond_out", x_t, "x_t");
  check_like(uncond_out, "uncond_out", x_t, "x_t");
  PreparedTeacherStep s;
  TeacherStepParams& p = s.params;
  check_finite(guidance_scale, "guidance_scale");
  p.guidance_scale = guidance_scale;
  p.guidance_scales = Vector{};
  if (guidance_scales.has_value()) {
    check_per_sample(*guidance_scales, "guidance_scale", x_t, "x_t", true, "one scale");
    p.guidance_scales = to_vector(s, *guidance_scales);
  }
  p.schedule = prepare_schedule(s, x_t, "x_t", t, t_prev, alphas_cumprod, prediction);
  p.dtype = to_dtype(x_t.scalar_type(), "x_t");
  p.batch = x_t.size(0);
  p.per_sample = x_t.numel() / p.batch;
  p.chunks = num_chunks(p.per_sample);
  p.x_t = keep_contiguous(s, x_t);
  p.cond = keep_contiguous(s, cond_out);
  p.uncond = keep_contiguous(s, uncond_out);
  s.out = at::empty(x_t.sizes(), x_t.options());
  p.out = s.out.mutable_data_ptr();
  return s;
}

PreparedGan prepare_gan(const c10::optional<at::Tensor>& real_logits, const at::Tensor& fake_logits) {
  check_float_tensor(fake_logits, "fake_logits");
  PreparedGan s;
  GanParams& p = s.params;
  p.real = nullptr;
  p.real_numel = p.real_chunks = 0;
  p.fake_sign = -1.0;
  if (real_logits.has_value()) {
    const at::Tensor& real = *real_logits;
    check_float_tensor(real, "real_logits");
    TORCH_CHECK_TYPE(real.scalar_type() == fake_logits.scalar_type(), "real_logits: expected dtype ",
                     dtype_name(fake_logits.scalar_type()), " (the dtype of fake_logits), got ",
                     dtype_name(real.scalar_type()));
    TORCH_CHECK_VALUE(real.device() == fake_logits.device(), "real_logits: expected device ", fake_logits.device(),
                      " (the device of fake_logits), got ", real.device());
    p.real = keep_contiguous(s, real);
    p.real_numel = real.numel();
    p.real_chunks = num_chunks(p.real_numel);
    p.fake_sign = 1.0;
  }
  p.fake = keep_contiguous(s, fake_logits);
  p.dtype = to_dtype(fake_logits.scalar_type(), "fake_logits");
  p.fake_numel = fake_logits.numel();
  p.fake_chunks = num_chunks(p.fake_numel);
  at::Tensor partials = at::empty({p.real_chunks + p.fake_chunks}, fake_logits.options().dtype(at::kDouble));
  s.keep.push_back(partials);
  p.partials = partials.mutable_data_ptr<double>();
  s.out = at::empty({}, fake_logits.options().dtype(loss_dtype(fake_logits.scalar_type())));
  p.loss = s.out.mutable_data_ptr();
  return s;
}

PreparedSoftplusBackward prepare_softplus_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                   double sign) {
  check_float_tensor(logits, "logits");
  TORCH_CHECK_VALUE(sign == 1.0 || sign == -1.0, "sign: expected 1.0 or -1.0, got ", double_repr(sign));
  const auto want = loss_dtype(logits.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.dim() == 0 && grad_loss.device() == logits.device(), "grad_loss: expected a 0-dim tensor on ",
                    logits.device(), ", got shape ", grad_loss.sizes(), " on ", grad_loss.device());
  TORCH_CHECK_TYPE(grad_loss.scalar_type() == want, "grad_loss: expected dtype ", dtype_name(want), ", got ",
                   dtype_name(grad_loss.scalar_type()));
  PreparedSoftplusBackward s;
  SoftplusBackwardParams& p = s.params;
  p.logits = keep_contiguous(s, logits);
  p.grad_loss = keep_contiguous(s, grad_loss);
  p.dtype = to_dtype(logits.scalar_type(), "logits");
  p.numel = logits.numel();
  p.chunks = num_chunks(p.numel);
  p.sign = sign;
  s.out = at::empty(logits.sizes(), logits.options());
  p.grad = s.out.mutable_data_ptr();
  return s;
}

namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor for the CPU kernel, got ", t.device());
}

template <class P>
void run_regression(const P& s, bool backward) {
  dispatch_dtype(s.params.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (backward) regression_backward<T>(s.params);
    else regression_forward<T>(s.params);
  });
}

at::Tensor pseudo_huber_loss_cpu(const at::Tensor& pred, const at::Tensor& target, double c) {
  check_cpu(pred, "pred");
  PreparedRegression s = prepare_pseudo_huber(at::Tensor(), pred, target, c);
  run_regression(s, false);
  return s.out;
}

at::Tensor pseudo_huber_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred,
                                          const at::Tensor& target, double c) {
  check_cpu(pred, "pred");
  PreparedRegression s = prepare_pseudo_huber(grad_loss, pred, target, c);
  run_regression(s, true);
  return s.out;
}

std::tuple<at::Tensor, at::Tensor> denoising_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                      const c10::optional<at::Tensor>& weight) {
  check_cpu(pred, "pred");
  PreparedRegression s = prepare_denoising(at::Tensor(), pred, target, weight);
  run_regression(s, false);
  return {s.out, s.sample_means};
}

at::Tensor denoising_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                                       const c10::optional<at::Tensor>& weight) {
  check_cpu(pred, "pred");
  PreparedRegression s = prepare_denoising(grad_loss, pred, target, weight);
  run_regression(s, true);
  return s.out;
}

at::Tensor lcd_loss_cpu(const at::Tensor& student_out, const at::Tensor& x_t, const at::Tensor& t,
                        const at::Tensor& target_out, const at::Tensor& x_prev, const at::Tensor& t_prev,
                        const at::Tensor& alphas_cumprod, c10::string_view prediction, c10::string_view loss,
                        double huber_c, double sigma_data, double timestep_scaling) {
  check_cpu(student_out, "student_out");
  PreparedRegression s = prepare_lcd(at::Tensor(), student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod,
                                     std::string(prediction), std::string(loss), huber_c, sigma_data,
                                     timestep_scaling);
  run_regression(s, false);
  return s.out;
}

at::Tensor lcd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_out, const at::Tensor& x_t,
                                 const at::Tensor& t, const at::Tensor& target_out, const at::Tensor& x_prev,
                                 const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                                 c10::string_view prediction, c10::string_view loss, double huber_c,
                                 double sigma_data, double timestep_scaling) {
  check_cpu(student_out, "student_out");
  PreparedRegression s = prepare_lcd(grad_loss, student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod,
                                     std::string(prediction), std::string(loss), huber_c, sigma_data,
                                     timestep_scaling);
  run_regression(s, true);
  return s.out;
}

at::Tensor lcd_teacher_step_cpu(const at::Tensor& x_t, const at::Tensor& cond_out, const at::Tensor& uncond_out,
                                const at::Tensor& t, const at::Tensor& t_prev, double guidance_scale,
                                const c10::optional<at::Tensor>& guidance_scales, const at::Tensor& alphas_cumprod,
                                c10::string_view prediction) {
  check_cpu(x_t, "x_t");
  PreparedTeacherStep s = prepare_teacher_step(x_t, cond_out, uncond_out, t, t_prev, guidance_scale, guidance_scales,
                                               alphas_cumprod, std::string(prediction));
  dispatch_dtype(s.params.dtype, [&](auto tag) { teacher_step<decltype(tag)>(s.params); });
  return s.out;
}

at::Tensor gan_discriminator_loss_cpu(const at::Tensor& real_logits, const at::Tensor& fake_logits) {
  check_cpu(fake_logits, "fake_logits");
  PreparedGan s = prepare_gan(real_logits, fake_logits);
  dispatch_dtype(s.params.dtype, [&](auto tag) { gan_forward<decltype(tag)>(s.params); });
  return s.out;
}

at::Tensor gan_generator_loss_cpu(const at::Tensor& fake_logits) {
  check_cpu(fake_logits, "fake_logits");
  PreparedGan s = prepare_gan(c10::nullopt, fake_logits);
  dispatch_dtype(s.params.dtype, [&](auto tag) { gan_forward<decltype(tag)>(s.params); });
  return s.out;
}

at::Tensor softplus_mean_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, double sign) {
  check_cpu(logits, "logits");
  PreparedSoftplusBackward s = prepare_softplus_backward(grad_loss, logits, sign);
  dispatch_dtype(s.params.dtype, [&](auto tag) { softplus_backward<decltype(tag)>(s.params); });
  return s.out;
}

}  // namespace
}  // namespace distill_losses
}  // namespace fewstep

TORCH_LIBRARY_FRAGMENT(fewstep, m) {
  m.impl_abstract_pystub("fewstep.losses.distill_losses");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("pseudo_huber_loss(Tensor pred, Tensor target, float c) -> Tensor", tags);
  m.def("pseudo_huber_loss_backward(Tensor grad_loss, Tensor pred, Tensor target, float c) -> Tensor", tags);
  m.def("denoising_loss(Tensor pred, Tensor target, Tensor? weight) -> (Tensor, Tensor)", tags);
  m.def("denoising_loss_backward(Tensor grad_loss, Tensor pred, Tensor target, Tensor? weight) -> Tensor", tags);
  m.def("lcd_loss(Tensor student_out, Tensor x_t, Tensor t, Tensor target_out, Tensor x_prev, Tensor t_prev, "
        "Tensor alphas_cumprod, str prediction, str loss, float huber_c, float sigma_data, float timestep_scaling) "
        "-> Tensor",
        tags);
  m.def("lcd_loss_backward(Tensor grad_loss, Tensor student_out, Tensor x_t, Tensor t, Tensor target_out, "
        "Tensor x_prev, Tensor t_prev, Tensor alphas_cumprod, str prediction, str loss, float huber_c, "
        "float sigma_data, float timestep_scaling) -> Tensor",
        tags);
  m.def("lcd_teacher_step(Tensor x_t, Tensor cond_out, Tensor uncond_out, Tensor t, Tensor t_prev, "
        "float guidance_scale, Tensor? guidance_scales, Tensor alphas_cumprod, str prediction) -> Tensor",
        tags);
  m.def("gan_discriminator_loss(Tensor real_logits, Tensor fake_logits) -> Tensor", tags);
  m.def("gan_generator_loss(Tensor fake_logits) -> Tensor", tags);
  m.def("softplus_mean_backward(Tensor grad_loss, Tensor logits, float sign) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(fewstep, CPU, m) {
  using namespace fewstep::distill_losses;
  m.impl("pseudo_huber_loss", &pseudo_huber_loss_cpu);
  m.impl("pseudo_huber_loss_backward", &pseudo_huber_loss_backward_cpu);
  m.impl("denoising_loss", &denoising_loss_cpu);
  m.impl("denoising_loss_backward", &denoising_loss_backward_cpu);
  m.impl("lcd_loss", &lcd_loss_cpu);
  m.impl("lcd_loss_backward", &lcd_loss_backward_cpu);
  m.impl("lcd_teacher_step", &lcd_teacher_step_cpu);
  m.impl("gan_discriminator_loss", &gan_discriminator_loss_cpu);
  m.impl("gan_generator_loss", &gan_generator_loss_cpu);
  m.impl("softplus_mean_backward", &softplus_mean_backward_cpu);
}
