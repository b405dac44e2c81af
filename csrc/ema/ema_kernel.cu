// CUDA kernel of the multi-tensor EMA update. No torch headers. Memory-bound (one read of each
// input, one write): each thread keeps kUnroll loads of both tensors in flight, kThreads apart
// so that a warp's accesses are coalesced; a block finds its tensor by binary search over the
// table's block prefix sums, then runs a loop specialized for the pair's dtypes.

#include <cstdint>

#include "fewstep/cuda_dtype.cuh"
#include "ema/ema_cuda.h"

namespace fewstep {
namespace ema {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 8;
constexpr int kTiles = 4;  // per block, to amortize the tensor lookup
constexpr int64_t kBlockElems = kThreads * kUnroll * kTiles;

// kTiles tiles of kThreads * kUnroll elements: every load of a tile is issued before its stores.
template <typename E, typename P>
__device__ __forceinline__ void update(void* ema, const void* param, int64_t first, int64_t n, double weight) {
  using C = typename Compute<E>::type;
  E* e = static_cast<E*>(ema);
  const P* x = static_cast<const P*>(param);
  const C w = static_cast<C>(weight);
  for (int tile = 0; tile < kTiles; ++tile, first += kThreads * kUnroll) {
    C ev[kUnroll], xv[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = first + k * kThreads;
      if (j < n) { ev[k] = to_compute(e[j]); xv[k] = to_compute(x[j]); }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = first + k * kThreads;
      if (j < n) e[j] = from_compute<E>(lerp(ev[k], static_cast<C>(xv[k]), w));
    }
  }
}

template <typename E>
__device__ __forceinline__ void update_for(DType pd, void* ema, const void* param, int64_t first, int64_t n,
                                           double weight) {
  switch (pd) {
    case DType::kFloat16: return update<E, __half>(ema, param, first, n, weight);
    case DType::kBFloat16: return update<E, __nv_bfloat16>(ema, param, first, n, weight);
    default: return update<E, float>(ema, param, first, n, weight);
  }
}

__global__ void __launch_bounds__(kThreads) ema_kernel(const Params p, const TensorTable t) {
  const int64_t block = blockIdx.x;
  const int i = t.index.tensor_of(block);
  const int64_t n = t.index.numel[i];
  const int64_t first = (block - t.index.block_begin[i]) * kBlockElems + threadIdx.x;
  switch (t.ema_dtype[i]) {
    case DType::kFloat64: return update<double, double>(t.ema[i], t.param[i], first, n, p.weight);
    case DType::kFloat16: return update_for<__half>(t.param_dtype[i], t.ema[i], t.param[i], first, n, p.weight);
    case DType::kBFloat16:
      return update_for<__nv_bfloat16>(t.param_dtype[i], t.ema[i], t.param[i], first, n, p.weight);
    default: return update_for<float>(t.param_dtype[i], t.ema[i], t.param[i], first, n, p.weight);
  }
}

}  // namespace

int64_t elements_per_block_cuda() { return kBlockElems; }

cudaError_t launch_ema_cuda(const Params& p, const TensorTable& t, cudaStream_t stream) {
  const int64_t blocks = t.index.num_blocks();
  if (blocks == 0) return cudaSuccess;
  ema_kernel<<<blocks, kThreads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

}  // namespace ema
}  // namespace fewstep
