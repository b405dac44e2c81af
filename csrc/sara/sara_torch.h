// Torch glue shared by the CPU (sara.cpp) and CUDA (sara_cuda.cpp) implementations: argument
// checks and the translation of tensors into the torch-free params of sara.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "sara/sara.h"

namespace fewstep {
namespace sara {

struct PreparedGather {
  GatherParams params;
  at::Tensor grad;  // contiguous copy if the given gradient was strided
};

PreparedGather prepare_gather(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& selection,
                              const at::Tensor& chunk_offsets, int64_t format, double scale);

struct PreparedAdamW {
  AdamWParams params;
  // Tensors split into groups of at most kMaxTensorsPerLaunch; heap-allocated (27 KiB each).
  std::vector<std::unique_ptr<TensorTable>> tables;
};

PreparedAdamW prepare_adamw(at::TensorList weights, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& master, const at::Tensor& grad, const at::Tensor& layout,
                            const at::Tensor& selection, const at::Tensor& chunk_offsets, double lr,
                            double beta1, double beta2, double eps, double weight_decay, int64_t step);

}  // namespace sara
}  // namespace fewstep
