// Multi-tensor launches (torch-free, shared by the CPU and CUDA kernels of ema and adamw): a
// list of tensors is split into tables of at most kMax tensors, each table small enough to live
// in kernel parameter space (32 KiB since CUDA 12.1) so that one launch covers it. Every tensor
// is cut into blocks of a fixed number of elements; a block finds its tensor by binary search
// over the blocks' prefix sums.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "fewstep/host_device.h"

namespace fewstep {

// What a kernel's parameters may occupy since CUDA 12.1 (on Volta and newer).
constexpr size_t kMaxKernelParamBytes = 32764;

template <int kMax>
struct BlockIndex {
  static constexpr int kMaxTensors = kMax;
  int num_tensors;
  int64_t block_begin[kMax + 1];  // prefix sum of each tensor's blocks, block_begin[0] = 0
  int64_t numel[kMax];

  FEWSTEP_HOST_DEVICE int64_t num_blocks() const { return block_begin[num_tensors]; }

  // The tensor block `block` belongs to: the last one whose first block is <= block (empty
  // tensors own no block and are never found).
  FEWSTEP_HOST_DEVICE int tensor_of(int64_t block) const {
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (block_begin[mid] <= block) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

// Appends a tensor of `numel` elements to the last table of `tables` (a new one when the last
// is full) and returns its slot there; the caller fills the table's per-tensor columns at it.
// Table: a struct with a BlockIndex member `index`.
template <class Table>
int append_tensor(std::vector<std::unique_ptr<Table>>& tables, int64_t numel, int64_t elements_per_block) {
  if (tables.empty() || tables.back()->index.num_tensors == decltype(Table::index)::kMaxTensors) {
    tables.push_back(std::make_unique<Table>());
    tables.back()->index.num_tensors = 0;
    tables.back()->index.block_begin[0] = 0;
  }
  auto& index = tables.back()->index;
  const int j = index.num_tensors++;
  index.numel[j] = numel;
  index.block_begin[j + 1] = index.block_begin[j] + (numel + elements_per_block - 1) / elements_per_block;
  return j;
}

// torch.lerp's formula: start + w (end - start) for w < 0.5, end - (end - start)(1 - w)
// otherwise, so that w = 0 and w = 1 are exact.
template <typename C>
FEWSTEP_HOST_DEVICE inline C lerp(C start, C end, C weight) {
  return weight < C(0.5) ? start + weight * (end - start) : end - (end - start) * (C(1) - weight);
}

}  // namespace fewstep
