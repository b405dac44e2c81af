// CUDA implementation of the SaRA sparse ops: torch glue around sara_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sara/sara_cuda.h"
#include "sara/sara_torch.h"

namespace fewstep {
namespace sara {
namespace {

void gather_cuda(const at::Tensor& grad, at::Tensor out, const at::Tensor& selection, const at::Tensor& chunk_offsets,
                 int64_t format, double scale) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const PreparedGather g = prepare_gather(grad, out, selection, chunk_offsets, format, scale);
  const cudaError_t err = launch_gather_cuda(g.params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fewstep::sara_gather_: CUDA launch failed: ", cudaGetErrorString(err));
}

void adamw_step_cuda(at::TensorList weights, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor master,
                     const at::Tensor& grad, const at::Tensor& layout, const at::Tensor& selection,
                     const at::Tensor& chunk_offsets, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step) {
  const c10::cuda::CUDAGuard guard(exp_avg.device());
  const PreparedAdamW prepared = prepare_adamw(weights, exp_avg, exp_avg_sq, master, grad, layout, selection,
                                               chunk_offsets, lr, beta1, beta2, eps, weight_decay, step);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& table : prepared.tables) {
    const cudaError_t err = launch_adamw_cuda(prepared.params, *table, stream);
    TORCH_CHECK(err == cudaSuccess, "fewstep::sara_adamw_step_: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace
}  // namespace sara
}  // namespace fewstep

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) {
  m.impl("sara_gather_", &fewstep::sara::gather_cuda);
  m.impl("sara_adamw_step_", &fewstep::sara::adamw_step_cuda);
}
