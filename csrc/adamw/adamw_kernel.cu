// CUDA kernel of the multi-tensor AdamW step (+ EMA). No torch headers. Memory-bound: each
// element reads x, g, m, v (and e) once and writes x, m, v (and e) once. Each thread keeps
// kUnroll elements of every array in flight, kThreads apart so that a warp's accesses are
// coalesced; a block finds its tensor by binary search over the table's block prefix sums, then
// runs a loop specialized for the parameter's dtype.

#include <cstdint>

#include "adamw/adamw_cuda.h"
#include "fewstep/cuda_dtype.cuh"

namespace fewstep {
namespace adamw {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = kThreads * 32;  // several tiles per block amortize the tensor lookup

// Tiles of kThreads * kUnroll elements of one parameter (element type P, moments and EMA in C):
// every load of a tile is issued before its stores. fp64 keeps half as many elements in flight
// (the same bytes), so that its registers do not bound the occupancy of the whole kernel.
template <typename P>
__device__ __forceinline__ void step_tiles(const Params& params, const TensorTable& t, int i, int64_t first) {
  using C = typename Compute<P>::type;
  constexpr int kUnroll = sizeof(C) == 8 ? 2 : 4;
  constexpr int kTiles = kBlockElems / (kThreads * kUnroll);
  const Coeffs<C> c(params);
  const int64_t n = t.index.numel[i];
  P* x = static_cast<P*>(t.param[i]);
  const P* g = static_cast<const P*>(t.grad[i]);
  C* m = static_cast<C*>(t.exp_avg[i]);
  C* v = static_cast<C*>(t.exp_avg_sq[i]);
  C* e = static_cast<C*>(t.ema[i]);
  for (int tile = 0; tile < kTiles; ++tile, first += kThreads * kUnroll) {
    C xv[kUnroll], gv[kUnroll], mv[kUnroll], vv[kUnroll], ev[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = first + k * kThreads;
      if (j < n) {
        xv[k] = to_compute(x[j]);
        gv[k] = to_compute(g[j]);
        mv[k] = m[j];
        vv[k] = v[j];
        if (e != nullptr) ev[k] = e[j];
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = first + k * kThreads;
      if (j < n) {
        const P xj = from_compute<P>(c.update(xv[k], gv[k], mv[k], vv[k]));
        x[j] = xj;
        m[j] = mv[k];
        v[j] = vv[k];
        if (e != nullptr) e[j] = lerp(ev[k], to_compute(xj), c.ema_weight);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const Params p, const TensorTable t) {
  const int64_t block = blockIdx.x;
  const int i = t.index.tensor_of(block);
  const int64_t first = (block - t.index.block_begin[i]) * kBlockElems + threadIdx.x;
  switch (t.dtype[i]) {
    case DType::kFloat64: return step_tiles<double>(p, t, i, first);
    case DType::kFloat16: return step_tiles<__half>(p, t, i, first);
    case DType::kBFloat16: return step_tiles<__nv_bfloat16>(p, t, i, first);
    default: return step_tiles<float>(p, t, i, first);
  }
}

}  // namespace

int64_t elements_per_block_cuda() { return kBlockElems; }

cudaError_t launch_adamw_cuda(const Params& p, const TensorTable& t, cudaStream_t stream) {
  const int64_t blocks = t.index.num_blocks();
  if (blocks == 0) return cudaSuccess;
  adamw_kernel<<<blocks, kThreads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

}  // namespace adamw
}  // namespace fewstep
