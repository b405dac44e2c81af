// CUDA implementation of the fused sampler step: torch glue around sampler_step_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sampler_step/sampler_step_cuda.h"
#include "sampler_step/sampler_step_torch.h"

namespace fewstep {
namespace sampler_step {
namespace {

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(
    const at::Tensor& x, const at::Tensor& model_output, const c10::optional<at::Tensor>& uncond,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& prev_x0,
    const c10::optional<at::Tensor>& cfg_rescale, c10::ArrayRef<double> coeffs, double guidance_scale,
    double clip_x0, bool return_x0) {
  const c10::cuda::CUDAGuard guard(x.device());
  PreparedStep s = prepare_step(x, model_output, uncond, noise, prev_x0, cfg_rescale, coeffs,
                                guidance_scale, clip_x0, return_x0);
  const cudaError_t err = launch_step_cuda(s.params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fewstep::sampler_step: CUDA launch failed: ", cudaGetErrorString(err));
  return {s.out, s.x0_out};
}

at::Tensor cfg_rescale_factor_cuda(const at::Tensor& model_output, const at::Tensor& uncond,
                                   double guidance_scale, double guidance_rescale) {
  const c10::cuda::CUDAGuard guard(model_output.device());
  PreparedRescale s = prepare_rescale(model_output, uncond, guidance_scale, guidance_rescale);
  TORCH_CHECK_VALUE(s.params.batch <= 65535, "cond: expected a batch of at most 65535, got ",
                    s.params.batch);
  s.params.chunks = rescale_chunks_cuda(s.params.per_sample);
  at::Tensor partials = at::empty({s.params.batch, s.params.chunks, 4}, model_output.options().dtype(at::kDouble));
  s.params.partials = partials.mutable_data_ptr<double>();
  const cudaError_t err = launch_rescale_cuda(s.params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fewstep::cfg_rescale_factor: CUDA launch failed: ", cudaGetErrorString(err));
  return s.factor;
}

}  // namespace
}  // namespace sampler_step
}  // namespace fewstep

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) {
  m.impl("sampler_step", &fewstep::sampler_step::sampler_step_cuda);
  m.impl("cfg_rescale_factor", &fewstep::sampler_step::cfg_rescale_factor_cuda);
}
