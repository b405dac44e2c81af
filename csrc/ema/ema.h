// Multi-tensor EMA update: torch-free parameter structs shared by the CPU and CUDA kernels.
//   ema[i] <- lerp(ema[i], param[i], w = 1 - decay), as torch.lerp computes it:
//   ema + w (param - ema) for w < 0.5, param - (1 - w)(param - ema) otherwise (exact at w = 0 and 1),
// in fp32 (fp64 for fp64 tensors), for every (ema, param) pair of the lists.
#pragma once

#include <cstdint>

#include "fewstep/dtype.h"

namespace fewstep {
namespace ema {

// One CUDA launch covers at most this many pairs (the table lives in kernel parameter space,
// 32 KiB since CUDA 12.1); longer lists take several launches.
constexpr int kMaxTensorsPerLaunch = 768;

struct TensorTable {
  int num_tensors;
  int64_t block_begin[kMaxTensorsPerLaunch + 1];  // prefix sum of each pair's blocks
  void* ema[kMaxTensorsPerLaunch];
  const void* param[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  DType ema_dtype[kMaxTensorsPerLaunch];
  DType param_dtype[kMaxTensorsPerLaunch];
};

struct Params {
  double weight;  // 1 - decay
};

template <typename C> inline
#ifdef __CUDACC__
__host__ __device__
#endif
C lerp(C start, C end, C weight) {
  return weight < C(0.5) ? start + weight * (end - start) : end - (end - start) * (C(1) - weight);
}

}  // namespace ema
}  // namespace fewstep
