// DMD / DMD2 generator loss: torch-free parameter structs shared by the CPU and CUDA kernels.
//
// Per sample b, with real = uncond + w (cond - uncond) when an unconditional prediction is given:
//   norm_b = mean over the sample of |x - real|
//   g      = (fake - real) / norm_b      (= (p_real - p_fake) / norm, p = x - x0; non-finite -> 0)
//   loss   = 0.5 mean(g^2)               (= 0.5 mean((x - sg(x - g))^2))
//   dloss/dx = g / numel
// The forward writes the loss and the per-sample norms (nothing input-sized); the backward
// recomputes g from real, fake and the norms and writes grad_loss * g / numel, so the head's only
// input-sized allocation is the gradient itself. Reductions use fixed chunks and a fixed
// summation order, in fp64: results are deterministic.
#pragma once

#include <cstdint>

#include "fewstep/dtype.h"

namespace fewstep {
namespace dmd_loss {

constexpr int64_t kChunk = 2048;  // elements per reduction chunk (CPU and CUDA alike)

inline int64_t num_chunks(int64_t per_sample) { return (per_sample + kChunk - 1) / kChunk; }

struct Params {
  const void* x;
  const void* real;    // x0 of the real score (its conditional prediction when `uncond` is set)
  const void* uncond;  // optional: the real score's unconditional x0, fused CFG
  const void* fake;    // x0 of the fake score
  void* grad;          // backward: dloss/dx, dtype of x
  const void* grad_loss;  // backward: 0-dim incoming gradient, dtype of the loss
  DType dtype;
  int64_t batch;
  int64_t per_sample;
  int64_t chunks;      // per-sample chunks of the reductions (kChunk elements each)
  double guidance_scale;
  double* norm_partials;  // [batch, chunks]
  double* loss_partials;  // [batch, chunks]
  void* loss;             // 0-dim output: fp64 for fp64 inputs, else fp32
  double* norm;           // [batch]: written by the forward, read by the backward
};

}  // namespace dmd_loss
}  // namespace fewstep
