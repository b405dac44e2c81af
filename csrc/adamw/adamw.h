// Multi-tensor AdamW step with an optional EMA of the updated parameters: torch-free parameter
// structs shared by the CPU and CUDA kernels.
//
// For every parameter x with gradient g, first moment m, second moment v (and EMA e), in the
// order and arithmetic of torch.optim.AdamW (maximize=False, amsgrad=False):
//   x <- x (1 - lr wd);  m <- lerp(m, g, 1 - beta1);  v <- v beta2 + (1 - beta2) g g
//   x <- x + (-lr / (1 - beta1^step)) m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
//   e <- lerp(e, x, 1 - ema_decay)   (x as stored, i.e. after rounding to its dtype)
// Parameters and gradients are fp16/bf16/fp32/fp64; m, v and e are fp32 (fp64 for fp64
// parameters) and all arithmetic is done in that type, so fp16/bf16 parameters are updated in
// fp32 and rounded once (no fp32 master copy is kept).
#pragma once

#include <cmath>
#include <cstdint>

#include "fewstep/dtype.h"
#include "fewstep/multi_tensor.h"

namespace fewstep {
namespace adamw {

// One launch covers at most this many parameters: 5 pointers, a size, a block offset and a
// dtype per parameter keep the table (28.5 KiB) in kernel parameter space.
constexpr int kMaxTensorsPerLaunch = 512;

struct TensorTable {
  BlockIndex<kMaxTensorsPerLaunch> index;
  void* param[kMaxTensorsPerLaunch];
  const void* grad[kMaxTensorsPerLaunch];
  void* exp_avg[kMaxTensorsPerLaunch];     // fp32, fp64 for fp64 parameters (also exp_avg_sq and ema)
  void* exp_avg_sq[kMaxTensorsPerLaunch];
  void* ema[kMaxTensorsPerLaunch];         // nullptr when the step keeps no EMA
  DType dtype[kMaxTensorsPerLaunch];       // of the parameter and its gradient
};

// The step's scalars, computed in double on the host as torch.optim.AdamW computes them in
// Python; the kernels round them once to their compute type, as torch rounds scalar arguments.
struct Params {
  double decay;            // 1 - lr * weight_decay
  double one_minus_beta1;  // the first moment's lerp weight
  double beta2, one_minus_beta2;
  double neg_step_size;    // -lr / (1 - beta1^step)
  double bc2_sqrt;         // sqrt(1 - beta2^step)
  double eps;
  double ema_weight;       // 1 - ema_decay
};

static_assert(sizeof(TensorTable) + sizeof(Params) <= kMaxKernelParamBytes, "one launch's arguments");

// Params in a kernel's compute type C (float or double).
template <typename C>
struct Coeffs {
  C decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, ema_weight;

  FEWSTEP_HOST_DEVICE explicit Coeffs(const Params& p)
      : decay(static_cast<C>(p.decay)), one_minus_beta1(static_cast<C>(p.one_minus_beta1)),
        beta2(static_cast<C>(p.beta2)), one_minus_beta2(static_cast<C>(p.one_minus_beta2)),
        neg_step_size(static_cast<C>(p.neg_step_size)), bc2_sqrt(static_cast<C>(p.bc2_sqrt)),
        eps(static_cast<C>(p.eps)), ema_weight(static_cast<C>(p.ema_weight)) {}

  // One element: updates m and v and returns the new parameter value (before rounding).
  FEWSTEP_HOST_DEVICE C update(C x, C g, C& m, C& v) const {
    x *= decay;
    m = lerp(m, g, one_minus_beta1);
    v = v * beta2 + one_minus_beta2 * g * g;
    return x + neg_step_size * m / (std::sqrt(v) / bc2_sqrt + eps);
  }
};

}  // namespace adamw
}  // namespace fewstep
