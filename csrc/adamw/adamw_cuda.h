// CUDA launcher of the multi-tensor AdamW step (adamw_kernel.cu). CUDA toolkit only.
#pragma once

#include <cuda_runtime.h>

#include "adamw/adamw.h"

namespace fewstep {
namespace adamw {

// Elements one block updates; the caller cuts the tensors of TensorTable::index with it.
int64_t elements_per_block_cuda();
cudaError_t launch_adamw_cuda(const Params& p, const TensorTable& t, cudaStream_t stream);

}  // namespace adamw
}  // namespace fewstep
