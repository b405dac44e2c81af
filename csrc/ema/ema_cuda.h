// CUDA launcher of the multi-tensor EMA update (ema_kernel.cu). CUDA toolkit only.
#pragma once

#include <cuda_runtime.h>

#include "ema/ema.h"

namespace fewstep {
namespace ema {

// Elements one block updates; the caller cuts the tensors of TensorTable::index with it.
int64_t elements_per_block_cuda();
cudaError_t launch_ema_cuda(const Params& p, const TensorTable& t, cudaStream_t stream);

}  // namespace ema
}  // namespace fewstep
