// CUDA launchers of the distillation losses (distill_losses_kernel.cu). CUDA toolkit only.
#pragma once

#include <cuda_runtime.h>

#include "distill_losses/distill_losses.h"

namespace fewstep {
namespace distill_losses {

cudaError_t launch_regression_loss_cuda(const RegressionParams& p, cudaStream_t stream);
cudaError_t launch_regression_loss_backward_cuda(const RegressionParams& p, cudaStream_t stream);
cudaError_t launch_teacher_step_cuda(const TeacherStepParams& p, cudaStream_t stream);
cudaError_t launch_gan_loss_cuda(const GanParams& p, cudaStream_t stream);
cudaError_t launch_softplus_mean_backward_cuda(const SoftplusBackwardParams& p, cudaStream_t stream);

}  // namespace distill_losses
}  // namespace fewstep
