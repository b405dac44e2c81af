// CUDA kernel of the multi-tensor EMA update. No torch headers. Memory-bound (one read of each
// input, one write): each thread keeps kUnroll loads of both tensors in flight, kThreads apart
// so that a warp's accesses are coalesced; a block finds its tensor by binary search over the
// table's block prefix sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ema/ema_cuda.h"

namespace fewstep {
namespace ema {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 8;
constexpr int64_t kBlockElems = kThreads * kUnroll;

__device__ __forceinline__ float load_f(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_f(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

__global__ void __launch_bounds__(kThreads) ema_kernel(const Params p, const TensorTable t) {
  const int64_t block = blockIdx.x;
  int lo = 0, hi = t.num_tensors - 1;  // last pair whose first block is <= this block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.block_begin[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const int i = lo;
  const int64_t n = t.numel[i];
  const int64_t first = (block - t.block_begin[i]) * kBlockElems + threadIdx.x;
  if (t.ema_dtype[i] == DType::kFloat64) {  // fp64 pairs (both fp64) compute in fp64
    double* e = static_cast<double*>(t.ema[i]);
    const double* x = static_cast<const double*>(t.param[i]);
    double ev[kUnroll], xv[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = first + k * kThreads;
      if (j < n) { ev[k] = e[j]; xv[k] = x[j]; }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = first + k * kThreads;
      if (j < n) e[j] = lerp(ev[k], xv[k], p.weight);
    }
    return;
  }
  const float w = static_cast<float>(p.weight);
  const DType ed = t.ema_dtype[i], pd = t.param_dtype[i];
  float ev[kUnroll], xv[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t j = first + k * kThreads;
    if (j < n) { ev[k] = load_f(t.ema[i], ed, j); xv[k] = load_f(t.param[i], pd, j); }
  }
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t j = first + k * kThreads;
    if (j < n) store_f(t.ema[i], ed, j, lerp(ev[k], xv[k], w));
  }
}

}  // namespace

int64_t elements_per_block_cuda() { return kBlockElems; }

cudaError_t launch_ema_cuda(const Params& p, const TensorTable& t, cudaStream_t stream) {
  const int64_t blocks = t.block_begin[t.num_tensors];
  if (blocks == 0) return cudaSuccess;
  ema_kernel<<<blocks, kThreads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

}  // namespace ema
}  // namespace fewstep
