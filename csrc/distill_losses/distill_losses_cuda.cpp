// CUDA implementation of the distillation losses: torch glue around distill_losses_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distill_losses/distill_losses_cuda.h"
#include "distill_losses/distill_losses_torch.h"

namespace fewstep {
namespace distill_losses {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fewstep::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

at::Tensor pseudo_huber_loss_cuda(const at::Tensor& pred, const at::Tensor& target, double c) {
  const c10::cuda::CUDAGuard guard(pred.device());
  PreparedRegression s = prepare_pseudo_huber(at::Tensor(), pred, target, c);
  check_launch(launch_regression_loss_cuda(s.params, stream()), "pseudo_huber_loss");
  return s.out;
}

at::Tensor pseudo_huber_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& pred,
                                           const at::Tensor& target, double c) {
  const c10::cuda::CUDAGuard guard(pred.device());
  PreparedRegression s = prepare_pseudo_huber(grad_loss, pred, target, c);
  check_launch(launch_regression_loss_backward_cuda(s.params, stream()), "pseudo_huber_loss_backward");
  return s.out;
}

std::tuple<at::Tensor, at::Tensor> denoising_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                       const c10::optional<at::Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(pred.device());
  PreparedRegression s = prepare_denoising(at::Tensor(), pred, target, weight);
  check_launch(launch_regression_loss_cuda(s.params, stream()), "denoising_loss");
  return {s.out, s.sample_means};
}

at::Tensor denoising_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(pred.device());
  PreparedRegression s = prepare_denoising(grad_loss, pred, target, weight);
  check_launch(launch_regression_loss_backward_cuda(s.params, stream()), "denoising_loss_backward");
  return s.out;
}

at::Tensor lcd_loss_cuda(const at::Tensor& student_out, const at::Tensor& x_t, const at::Tensor& t,
                         const at::Tensor& target_out, const at::Tensor& x_prev, const at::Tensor& t_prev,
                         const at::Tensor& alphas_cumprod, c10::string_view prediction, c10::string_view loss,
                         double huber_c, double sigma_data, double timestep_scaling) {
  const c10::cuda::CUDAGuard guard(student_out.device());
  PreparedRegression s = prepare_lcd(at::Tensor(), student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod,
                                     std::string(prediction), std::string(loss), huber_c, sigma_data,
                                     timestep_scaling);
  check_launch(launch_regression_loss_cuda(s.params, stream()), "lcd_loss");
  return s.out;
}

at::Tensor lcd_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student_out, const at::Tensor& x_t,
                                  const at::Tensor& t, const at::Tensor& target_out, const at::Tensor& x_prev,
                                  const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                                  c10::string_view prediction, c10::string_view loss, double huber_c,
                                  double sigma_data, double timestep_scaling) {
  const c10::cuda::CUDAGuard guard(student_out.device());
  PreparedRegression s = prepare_lcd(grad_loss, student_out, x_t, t, target_out, x_prev, t_prev, alphas_cumprod,
                                     std::string(prediction), std::string(loss), huber_c, sigma_data,
                                     timestep_scaling);
  check_launch(launch_regression_loss_backward_cuda(s.params, stream()), "lcd_loss_backward");
  return s.out;
}

at::Tensor lcd_teacher_step_cuda(const at::Tensor& x_t, const at::Tensor& cond_out, const at::Tensor& uncond_out,
                                 const at::Tensor& t, const at::Tensor& t_prev, double guidance_scale,
                                 const c10::optional<at::Tensor>& guidance_scales, const at::Tensor& alphas_cumprod,
                                 c10::string_view prediction) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  PreparedTeacherStep s = prepare_teacher_step(x_t, cond_out, uncond_out, t, t_prev, guidance_scale, guidance_scales,
                                               alphas_cumprod, std::string(prediction));
  check_launch(launch_teacher_step_cuda(s.params, stream()), "lcd_teacher_step");
  return s.out;
}

at::Tensor gan_discriminator_loss_cuda(const at::Tensor& real_logits, const at::Tensor& fake_logits) {
  const c10::cuda::CUDAGuard guard(fake_logits.device());
  PreparedGan s = prepare_gan(real_logits, fake_logits);
  check_launch(launch_gan_loss_cuda(s.params, stream()), "gan_discriminator_loss");
  return s.out;
}

at::Tensor gan_generator_loss_cuda(const at::Tensor& fake_logits) {
  const c10::cuda::CUDAGuard guard(fake_logits.device());
  PreparedGan s = prepare_gan(c10::nullopt, fake_logits);
  check_launch(launch_gan_loss_cuda(s.params, stream()), "gan_generator_loss");
  return s.out;
}

at::Tensor softplus_mean_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, double sign) {
  const c10::cuda::CUDAGuard guard(logits.device());
  PreparedSoftplusBackward s = prepare_softplus_backward(grad_loss, logits, sign);
  check_launch(launch_softplus_mean_backward_cuda(s.params, stream()), "softplus_mean_backward");
  return s.out;
}

}  // namespace
}  // namespace distill_losses
}  // namespace fewstep

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) {
  using namespace fewstep::distill_losses;
  m.impl("pseudo_huber_loss", &pseudo_huber_loss_cuda);
  m.impl("pseudo_huber_loss_backward", &pseudo_huber_loss_backward_cuda);
  m.impl("denoising_loss", &denoising_loss_cuda);
  m.impl("denoising_loss_backward", &denoising_loss_backward_cuda);
  m.impl("lcd_loss", &lcd_loss_cuda);
  m.impl("lcd_loss_backward", &lcd_loss_backward_cuda);
  m.impl("lcd_teacher_step", &lcd_teacher_step_cuda);
  m.impl("gan_discriminator_loss", &gan_discriminator_loss_cuda);
  m.impl("gan_generator_loss", &gan_generator_loss_cuda);
  m.impl("softplus_mean_backward", &softplus_mean_backward_cuda);
}
