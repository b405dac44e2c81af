// Torch glue shared by the CPU (adamw.cpp) and CUDA (adamw_cuda.cpp) AdamW step: argument
// checks, the step's scalars and the tensor tables.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "adamw/adamw.h"

namespace fewstep {
namespace adamw {

struct PreparedStep {
  Params params;
  std::vector<std::unique_ptr<TensorTable>> tables;  // each of at most kMaxTensorsPerLaunch parameters
};

// Checks the lists and scalars (every failure names the argument) and cuts every parameter
// into blocks of `elements_per_block` elements.
PreparedStep prepare_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList ema_params, int64_t step, double lr,
                          double beta1, double beta2, double eps, double weight_decay, double ema_decay,
                          int64_t elements_per_block);

}  // namespace adamw
}  // namespace fewstep
