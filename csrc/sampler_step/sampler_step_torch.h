// Torch-facing glue of the fused sampler step, shared by the CPU and CUDA implementations:
// checks the inputs, makes them contiguous, allocates the outputs and fills the params.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "sampler_step/sampler_step.h"

namespace fewstep {
namespace sampler_step {

struct PreparedStep {
  at::Tensor x, model_output, uncond, noise, prev_x0, rescale;  // contiguous (or undefined)
  at::Tensor out, x0_out;
  StepParams params;
};

PreparedStep prepare_step(const at::Tensor& x, const at::Tensor& model_output,
                          const c10::optional<at::Tensor>& uncond,
                          const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& prev_x0,
                          const c10::optional<at::Tensor>& cfg_rescale, c10::ArrayRef<double> coeffs,
                          double guidance_scale, double clip_x0, bool return_x0);

struct PreparedRescale {
  at::Tensor cond, uncond, factor;
  RescaleParams params;
};

PreparedRescale prepare_rescale(const at::Tensor& model_output, const at::Tensor& uncond,
                                double guidance_scale, double guidance_rescale);

}  // namespace sampler_step
}  // namespace fewstep
