// Torch glue shared by the CPU (dmd_loss.cpp) and CUDA (dmd_loss_cuda.cpp) DMD loss.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "dmd_loss/dmd_loss.h"

namespace fewstep {
namespace dmd_loss {

struct Prepared {
  Params params;
  at::Tensor x, real, uncond, fake;  // contiguous inputs
  at::Tensor loss, norm, grad, grad_loss, norm_partials, loss_partials;
};

// Forward: allocates the loss, the per-sample norms and the reduction partials.
Prepared prepare_forward(const at::Tensor& x, const at::Tensor& real, const c10::optional<at::Tensor>& uncond,
                         double guidance_scale, const at::Tensor& fake);
// Backward: allocates the gradient of x (the shape and dtype of `fake`).
Prepared prepare_backward(const at::Tensor& grad_loss, const at::Tensor& real,
                          const c10::optional<at::Tensor>& uncond, double guidance_scale, const at::Tensor& fake,
                          const at::Tensor& norm);

}  // namespace dmd_loss
}  // namespace fewstep
