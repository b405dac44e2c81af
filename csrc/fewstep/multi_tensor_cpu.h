// CPU side of multi-tensor launches (multi_tensor.h): the table's blocks run as at::parallel_for
// tasks.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "fewstep/multi_tensor.h"

namespace fewstep {

// Calls fn(tensor, begin, end) for every block of `index`, [begin, end) being the block's
// element range inside its tensor.
template <int kMax, class Fn>
void parallel_for_each_block(const BlockIndex<kMax>& index, int64_t elements_per_block, const Fn& fn) {
  at::parallel_for(0, index.num_blocks(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int i = index.tensor_of(b);
      const int64_t begin = (b - index.block_begin[i]) * elements_per_block;
      fn(i, begin, std::min(index.numel[i], begin + elements_per_block));
    }
  });
}

}  // namespace fewstep
