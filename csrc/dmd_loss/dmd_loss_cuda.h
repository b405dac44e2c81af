// CUDA launcher of the DMD generator loss (dmd_loss_kernel.cu). CUDA toolkit only.
#pragma once

#include <cuda_runtime.h>

#include "dmd_loss/dmd_loss.h"

namespace fewstep {
namespace dmd_loss {

cudaError_t launch_dmd_loss_cuda(const Params& p, cudaStream_t stream);
cudaError_t launch_dmd_loss_backward_cuda(const Params& p, cudaStream_t stream);

}  // namespace dmd_loss
}  // namespace fewstep
