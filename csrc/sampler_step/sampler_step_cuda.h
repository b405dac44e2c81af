// CUDA launchers of the fused sampler step (sampler_step_kernel.cu). CUDA toolkit only.
#pragma once

#include <cuda_runtime.h>

#include "sampler_step/sampler_step.h"

namespace fewstep {
namespace sampler_step {

cudaError_t launch_step_cuda(const StepParams& p, cudaStream_t stream);

// Number of partial-sum chunks per sample that launch_rescale_cuda writes; the caller
// allocates partials of [batch, chunks, 4] doubles.
int64_t rescale_chunks_cuda(int64_t per_sample);
cudaError_t launch_rescale_cuda(const RescaleParams& p, cudaStream_t stream);

}  // namespace sampler_step
}  // namespace fewstep
