// Torch glue shared by the CPU (ema.cpp) and CUDA (ema_cuda.cpp) EMA update: argument checks and
// the tensor table of sara.h-style params.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "ema/ema.h"

namespace fewstep {
namespace ema {

// Checks the lists and splits them into tables of at most kMaxTensorsPerLaunch pairs, each pair
// cut into blocks of `elements_per_block` elements.
std::vector<std::unique_ptr<TensorTable>> prepare_ema(at::TensorList ema, at::TensorList params, double decay,
                                                      int64_t elements_per_block);

}  // namespace ema
}  // namespace fewstep
