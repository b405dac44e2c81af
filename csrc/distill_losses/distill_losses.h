// Distillation losses besides DMD: torch-free parameter structs and the per-sample coefficient
// math shared by the CPU and CUDA kernels.
//
// Regression losses (pseudo-Huber, denoising, LCD) compare two per-sample affine forms elementwise:
//   u = f_b(A, B),  v = g_b(C, D),  e = u - v
//   loss = (1/batch) sum_b w_b mean_i phi(e),  phi(e) = sqrt(e^2 + c^2) - c  or  e^2
//   dloss/dX = grad_loss w_b / (batch per_sample) phi'(e) g_b   (X: pred or student_out, g_b its coefficient)
// pseudo_huber and denoising: u = A = pred, v = C = target. LCD: A = x_t, B = student_out,
// C = x_prev, D = target_out, and f, g the consistency function c_skip x + c_out x0 at t and t_prev.
// LCD's teacher step is one more affine form: x_prev = k_x x_t + k_o ((1 + w) cond - w uncond).
// GAN losses: mean softplus(-real) + mean softplus(s fake), s = +1 (discriminator) or -1 (generator).
//
// Reductions use fixed chunks and a fixed summation order, in fp64: results are deterministic.
// Backward kernels recompute from the inputs: nothing input-sized is kept from the forward.
// A timestep outside the alphas_cumprod table reads NaN (never out of bounds, no host check).
#pragma once

#include <cmath>
#include <cstdint>

#include "fewstep/dtype.h"
#include "fewstep/host_device.h"

namespace fewstep {
namespace distill_losses {

constexpr int64_t kChunk = 2048;  // elements per reduction chunk (CPU and CUDA alike)

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

enum class Prediction : uint8_t { kEps, kX0, kV };
enum class Distance : uint8_t { kPseudoHuber, kSquare };

// A small float32 or float64 vector (a schedule table, per-sample weights or scales).
struct Vector {
  const void* data = nullptr;
  bool is_double = false;
  int64_t size = 0;

  FEWSTEP_HOST_DEVICE double at(int64_t i) const {
    return is_double ? static_cast<const double*>(data)[i] : static_cast<double>(static_cast<const float*>(data)[i]);
  }
  // Entry i, NaN when i is out of range.
  FEWSTEP_HOST_DEVICE double at_or_nan(int64_t i) const { return i >= 0 && i < size ? at(i) : nan(""); }
};

// x0 = ax x + bx out and eps = ae x + be out from a raw model output at x (alpha_cumprod a): the
// teacher step's coefficients (folded into k_x, k_o in fp64, better conditioned than step by step).
struct Conversion {
  double ax, bx, ae, be;
};

FEWSTEP_HOST_DEVICE inline Conversion conversion(Prediction prediction, double alpha_cumprod) {
  const double alpha = sqrt(alpha_cumprod), sigma = sqrt(1.0 - alpha_cumprod);
  switch (prediction) {
    case Prediction::kX0: return {0.0, 1.0, 1.0 / sigma, -alpha / sigma};
    case Prediction::kV: return {alpha, -sigma, sigma, alpha};
    default: return {1.0 / alpha, -sigma / alpha, 0.0, 1.0};
  }
}

struct LcdSchedule {
  const int64_t* t;       // [batch]
  const int64_t* t_prev;  // [batch]
  Vector alphas_cumprod;
  Prediction prediction;
  double sigma_data;
  double timestep_scaling;
};

// The consistency function c_skip(t) x + c_out(t) x0 of a raw output `out` at x, as
// skip x + scale (p x + q out) with skip = c_skip, scale = c_out r and x0 = r (p x + q out):
// eps: x0 = (x - sigma out) / alpha, v: x0 = alpha x - sigma out, x0: x0 = out. The small difference x - sigma out of noised data and an
// eps-prediction is formed first, as PyTorch's step-by-step chain does (no 1/alpha-sized terms).
struct ConsistencyForm {
  double skip, scale, p, q;
};

FEWSTEP_HOST_DEVICE inline ConsistencyForm consistency_form(const LcdSchedule& s, int64_t t) {
  const double a = s.alphas_cumprod.at_or_nan(t);
  const double alpha = sqrt(a), sigma = sqrt(1.0 - a);
  const double st = s.timestep_scaling * static_cast<double>(t), sd2 = s.sigma_data * s.sigma_data;
  const double c_skip = sd2 / (st * st + sd2), c_out = st / sqrt(st * st + sd2);
  switch (s.prediction) {
    case Prediction::kX0: return {c_skip, c_out, 0.0, 1.0};
    case Prediction::kV: return {c_skip, c_out, alpha, -sigma};
    default: return {c_skip, c_out / alpha, 1.0, -sigma};
  }
}

struct RegressionParams {
  const void* a;  // pred (pseudo_huber, denoising) or x_t (lcd)
  const void* b;  // student_out (lcd) or null
  const void* c;  // target (pseudo_huber, denoising) or x_prev (lcd)
  const void* d;  // target_out (lcd) or null
  DType dtype;
  int64_t batch;
  int64_t per_sample;
  int64_t chunks;  // per-sample chunks of the reduction (kChunk elements each)
  Distance distance;
  double huber_c;
  Vector weight;          // [batch] or empty (all 1)
  bool lcd;               // coefficients from `schedule`, else a = c = 1
  LcdSchedule schedule;
  double* partials;       // forward: [batch, chunks] sums of phi
  double* sample_means;   // forward: [batch] mean of phi per sample
  void* loss;             // forward: 0-dim, fp64 for fp64 inputs, else fp32
  const void* grad_loss;  // backward: 0-dim incoming gradient, dtype of the loss
  void* grad;             // backward: dloss/d(pred or student_out), dtype of the inputs
};

// A ConsistencyForm in the compute type C of the kernels.
template <typename C>
struct ConsistencyFormIn {
  C skip, scale, p, q;

  FEWSTEP_HOST_DEVICE explicit ConsistencyFormIn(const ConsistencyForm& f)
      : skip(static_cast<C>(f.skip)), scale(static_cast<C>(f.scale)), p(static_cast<C>(f.p)), q(static_cast<C>(f.q)) {}

  FEWSTEP_HOST_DEVICE C operator()(C x, C out) const { return skip * x + scale * (p * x + q * out); }
};

// u = a.skip A + a.scale (a.p A + a.q B), v likewise from (C, D); pseudo_huber and denoising: u = A, v = C.
struct SampleCoefficients {
  ConsistencyForm a, c;
  double grad;  // du/dX of the differentiated input
};

FEWSTEP_HOST_DEVICE inline SampleCoefficients sample_coefficients(const RegressionParams& p, int64_t b) {
  if (!p.lcd) return {{1.0, 0.0, 0.0, 0.0}, {1.0, 0.0, 0.0, 0.0}, 1.0};
  SampleCoefficients k;
  k.a = consistency_form(p.schedule, p.schedule.t[b]);
  k.c = consistency_form(p.schedule, p.schedule.t_prev[b]);
  k.grad = k.a.scale * k.a.q;
  return k;
}

struct TeacherStepParams {
  const void* x_t;
  const void* cond;
  const void* uncond;
  void* out;
  DType dtype;
  int64_t batch;
  int64_t per_sample;
  int64_t chunks;
  LcdSchedule schedule;  // sigma_data and timestep_scaling unused
  double guidance_scale;
  Vector guidance_scales;  // [batch] or empty (guidance_scale for all)
};

// x_prev = k_x x_t + k_cond cond + k_uncond uncond for sample b.
struct TeacherCoefficients {
  double x, cond, uncond;
};

FEWSTEP_HOST_DEVICE inline TeacherCoefficients teacher_coefficients(const TeacherStepParams& p, int64_t b) {
  const Conversion k = conversion(p.schedule.prediction, p.schedule.alphas_cumprod.at_or_nan(p.schedule.t[b]));
  const double a_prev = p.schedule.alphas_cumprod.at_or_nan(p.schedule.t_prev[b]);
  const double alpha_prev = sqrt(a_prev), sigma_prev = sqrt(1.0 - a_prev);
  const double w = p.guidance_scales.data != nullptr ? p.guidance_scales.at(b) : p.guidance_scale;
  const double on_out = alpha_prev * k.bx + sigma_prev * k.be;
  return {alpha_prev * k.ax + sigma_prev * k.ae, (1.0 + w) * on_out, -w * on_out};
}

struct GanParams {
  const void* real;  // null for the generator loss
  const void* fake;
  DType dtype;
  int64_t real_numel, fake_numel;
  int64_t real_chunks, fake_chunks;
  double fake_sign;  // +1: discriminator, -1: generator
  double* partials;  // [real_chunks + fake_chunks]
  void* loss;
};

// Backward of mean softplus(sign x) over one logits tensor: grad_loss sign sigmoid(sign x) / numel.
struct SoftplusBackwardParams {
  const void* logits;
  void* grad;
  const void* grad_loss;
  DType dtype;
  int64_t numel;
  int64_t chunks;
  double sign;
};

// log(1 + exp(x)) without overflow, exact for large |x|.
template <typename C>
FEWSTEP_HOST_DEVICE inline C softplus(C x) {
  using std::exp, std::fabs, std::log1p;
  return (x > C(0) ? x : C(0)) + log1p(exp(-fabs(x)));
}

template <typename C>
FEWSTEP_HOST_DEVICE inline C sigmoid(C x) {
  using std::exp, std::fabs;
  const C z = exp(-fabs(x));  // in (0, 1]: no overflow
  return x >= C(0) ? C(1) / (C(1) + z) : z / (C(1) + z);
}

template <typename C>
FEWSTEP_HOST_DEVICE inline C distance(Distance kind, C e, C c) {
  using std::sqrt;
  return kind == Distance::kSquare ? e * e : sqrt(e * e + c * c) - c;
}

template <typename C>
FEWSTEP_HOST_DEVICE inline C distance_derivative(Distance kind, C e, C c) {
  using std::sqrt;
  return kind == Distance::kSquare ? C(2) * e : e / sqrt(e * e + c * c);
}

}  // namespace distill_losses
}  // namespace fewstep
