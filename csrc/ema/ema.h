// Multi-tensor EMA update: torch-free parameter structs shared by the CPU and CUDA kernels.
//   ema[i] <- lerp(ema[i], param[i], w = 1 - decay), as torch.lerp computes it (fewstep::lerp),
// in fp32 (fp64 for fp64 tensors), for every (ema, param) pair of the lists.
#pragma once

#include <cstdint>

#include "fewstep/dtype.h"
#include "fewstep/multi_tensor.h"

namespace fewstep {
namespace ema {

// One CUDA launch covers at most this many pairs (the table lives in kernel parameter space,
// 32 KiB since CUDA 12.1); longer lists take several launches.
constexpr int kMaxTensorsPerLaunch = 768;

struct TensorTable {
  BlockIndex<kMaxTensorsPerLaunch> index;  // the pairs' sizes and blocks
  void* ema[kMaxTensorsPerLaunch];
  const void* param[kMaxTensorsPerLaunch];
  DType ema_dtype[kMaxTensorsPerLaunch];
  DType param_dtype[kMaxTensorsPerLaunch];
};

struct Params {
  double weight;  // 1 - decay
};

static_assert(sizeof(TensorTable) + sizeof(Params) <= kMaxKernelParamBytes, "one launch's arguments");

}  // namespace ema
}  // namespace fewstep
