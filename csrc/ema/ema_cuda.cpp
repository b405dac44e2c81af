// CUDA implementation of the multi-tensor EMA update: torch glue around ema_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ema/ema_cuda.h"
#include "ema/ema_torch.h"

namespace fewstep {
namespace ema {
namespace {

void ema_update_cuda(at::TensorList ema, at::TensorList params, double decay) {
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const auto tables = prepare_ema(ema, params, decay, elements_per_block_cuda());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& table : tables) {
    const cudaError_t err = launch_ema_cuda(Params{1.0 - decay}, *table, stream);
    TORCH_CHECK(err == cudaSuccess, "fewstep::ema_update_: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace
}  // namespace ema
}  // namespace fewstep

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) { m.impl("ema_update_", &fewstep::ema::ema_update_cuda); }
