// Deterministic block-wide sum for fewstep's CUDA reductions (CUDA toolkit only, no torch).
#pragma once

namespace fewstep {

// Sum of v over the block's kThreads threads in a fixed order: each warp by shuffles, then the warp
// results in index order. Valid in thread 0; every thread of the block must call it.
template <int kThreads>
__device__ __forceinline__ double block_sum(double v) {
  static_assert(kThreads % 32 == 0, "whole warps");
  __shared__ double warp_sums[kThreads / 32];
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums may be reused by the next call
  return total;
}

}  // namespace fewstep
