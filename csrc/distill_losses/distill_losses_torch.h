// Torch glue shared by the CPU (distill_losses.cpp) and CUDA (distill_losses_cuda.cpp) kernels:
// argument checks, contiguous inputs, output allocation and params filling.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "distill_losses/distill_losses.h"

namespace fewstep {
namespace distill_losses {

// Keeps the tensors the params point into alive.
struct Prepared {
  std::vector<at::Tensor> keep;
  at::Tensor out, sample_means;
};

struct PreparedRegression : Prepared {
  RegressionParams params;
};
struct PreparedTeacherStep : Prepared {
  TeacherStepParams params;
};
struct PreparedGan : Prepared {
  GanParams params;
};
struct PreparedSoftplusBackward : Prepared {
  SoftplusBackwardParams params;
};

// Regression losses: forward (grad_loss undefined) allocates the loss, per-sample means and
// partials; backward allocates the gradient of pred / student_out.
PreparedRegression prepare_pseudo_huber(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                                        double c);
PreparedRegression prepare_denoising(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                                     const c10::optional<at::Tensor>& weight);
PreparedRegression prepare_lcd(const at::Tensor& grad_loss, const at::Tensor& student_out, const at::Tensor& x_t,
                               const at::Tensor& t, const at::Tensor& target_out, const at::Tensor& x_prev,
                               const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                               const std::string& prediction, const std::string& loss, double huber_c,
                               double sigma_data, double timestep_scaling);
PreparedTeacherStep prepare_teacher_step(const at::Tensor& x_t, const at::Tensor& cond_out,
                                         const at::Tensor& uncond_out, const at::Tensor& t, const at::Tensor& t_prev,
                                         double guidance_scale, const c10::optional<at::Tensor>& guidance_scales,
                                         const at::Tensor& alphas_cumprod, const std::string& prediction);
PreparedGan prepare_gan(const c10::optional<at::Tensor>& real_logits, const at::Tensor& fake_logits);
PreparedSoftplusBackward prepare_softplus_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                   double sign);

}  // namespace distill_losses
}  // namespace fewstep
