// CUDA launchers of the SaRA sparse kernels (sara_kernel.cu). CUDA toolkit only.
#pragma once

#include <cuda_runtime.h>

#include "sara/sara.h"

namespace fewstep {
namespace sara {

cudaError_t launch_gather_cuda(const GatherParams& p, cudaStream_t stream);
cudaError_t launch_adamw_cuda(const AdamWParams& p, const TensorTable& table, cudaStream_t stream);

}  // namespace sara
}  // namespace fewstep
