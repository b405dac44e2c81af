// CUDA implementation of the DMD generator loss: torch glue around dmd_loss_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dmd_loss/dmd_loss_cuda.h"
#include "dmd_loss/dmd_loss_torch.h"

namespace fewstep {
namespace dmd_loss {
namespace {

std::tuple<at::Tensor, at::Tensor> dmd_loss_cuda(const at::Tensor& x, const at::Tensor& real,
                                                 const c10::optional<at::Tensor>& uncond, double guidance_scale,
                                                 const at::Tensor& fake) {
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared s = prepare_forward(x, real, uncond, guidance_scale, fake);
  const cudaError_t err = launch_dmd_loss_cuda(s.params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fewstep::dmd_loss: CUDA launch failed: ", cudaGetErrorString(err));
  return {s.loss, s.norm};
}

at::Tensor dmd_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& real,
                                  const c10::optional<at::Tensor>& uncond, double guidance_scale,
                                  const at::Tensor& fake, const at::Tensor& norm) {
  const c10::cuda::CUDAGuard guard(fake.device());
  Prepared s = prepare_backward(grad_loss, real, uncond, guidance_scale, fake, norm);
  const cudaError_t err = launch_dmd_loss_backward_cuda(s.params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fewstep::dmd_loss_backward: CUDA launch failed: ", cudaGetErrorString(err));
  return s.grad;
}

}  // namespace
}  // namespace dmd_loss
}  // namespace fewstep

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) {
  m.impl("dmd_loss", &fewstep::dmd_loss::dmd_loss_cuda);
  m.impl("dmd_loss_backward", &fewstep::dmd_loss::dmd_loss_backward_cuda);
}
