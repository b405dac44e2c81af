// CUDA implementation of the multi-tensor AdamW step: torch glue around adamw_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "adamw/adamw_cuda.h"
#include "adamw/adamw_torch.h"

namespace fewstep {
namespace adamw {
namespace {

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList ema_params, int64_t step, double lr, double beta1,
                     double beta2, double eps, double weight_decay, double ema_decay) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const PreparedStep prepared = prepare_step(params, grads, exp_avgs, exp_avg_sqs, ema_params, step, lr, beta1,
                                             beta2, eps, weight_decay, ema_decay, elements_per_block_cuda());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& table : prepared.tables) {
    const cudaError_t err = launch_adamw_cuda(prepared.params, *table, stream);
    TORCH_CHECK(err == cudaSuccess, "fewstep::adamw_step_: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace
}  // namespace adamw
}  // namespace fewstep

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) { m.impl("adamw_step_", &fewstep::adamw::adamw_step_cuda); }
