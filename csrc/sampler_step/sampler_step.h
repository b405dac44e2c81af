// Fused sampler step: torch-free parameters shared by the CPU and CUDA kernels.
// Semantics (python/fewstep/reference/sampler_step.py):
//   m  = (u ? u + w (m - u) : m) * (rescale ? rescale[b] : 1)
//   xt = x + k_churn z
//   x0 = clamp(a_x xt + a_m m, -clip, clip)
//   eps = e_x xt + e_m m + e_0 x0
//   out = o_x xt + o_m m + o_0 x0 + o_e eps + o_p p + o_z z
//   x0_out = d_x xt + d_0 x0
#pragma once

#include <cstdint>

#include "fewstep/dtype.h"

namespace fewstep {

namespace sampler_step {

enum Coeff : int { kChurn, kAx, kAm, kEx, kEm, kE0, kOx, kOm, kO0, kOe, kOp, kOz, kDx, kD0, kNumCoeffs };

struct StepParams {
  const void* x;
  const void* model_output;
  const void* uncond;       // nullable: no CFG
  const void* noise;        // nullable
  const void* prev_x0;      // nullable
  const void* rescale;      // nullable: per-sample CFG-rescale factor [batch], float64 for
                            // float64 inputs, float32 otherwise
  void* out;
  void* x0_out;             // nullable
  int64_t numel;
  int64_t per_sample;       // elements per batch sample (indexes rescale)
  double coeffs[kNumCoeffs];
  double guidance_scale;
  double clip;              // +inf: no clipping
  DType dtype;
};

struct RescaleParams {
  const void* cond;
  const void* uncond;
  double* partials;         // [batch, chunks, 4]: sum c, sum c^2, sum g, sum g^2
  void* factor;             // [batch], float64 for float64 inputs, float32 otherwise
  int64_t batch;
  int64_t per_sample;
  int64_t chunks;
  double guidance_scale;
  double guidance_rescale;
  DType dtype;
};

}  // namespace sampler_step
}  // namespace fewstep
