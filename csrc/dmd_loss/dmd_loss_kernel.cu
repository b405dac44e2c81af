// CUDA kernels of the DMD generator loss. No torch headers. Forward, three launches: per-chunk
// sums of |x - real|; per-sample norms and per-chunk sums of g^2; the scalar loss. Backward, one:
// g recomputed from real, fake and the norms, scaled by the incoming gradient.
// Every sum has a fixed order (threads, then a fixed tree, then chunks in index order), so the
// result does not depend on scheduling.

#include <cmath>
#include <cstdint>

#include "fewstep/block_reduce.cuh"
#include "fewstep/cuda_dtype.cuh"
#include "dmd_loss/dmd_loss_cuda.h"

namespace fewstep {
namespace dmd_loss {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ typename Compute<T>::type real_at(const Params& p, int64_t i) {
  using C = typename Compute<T>::type;
  const C r = to_compute(static_cast<const T*>(p.real)[i]);
  if (p.uncond == nullptr) return r;
  const C u = to_compute(static_cast<const T*>(p.uncond)[i]);
  return u + static_cast<C>(p.guidance_scale) * (r - u);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) norm_kernel(const Params p) {
  using C = typename Compute<T>::type;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t base = b * p.per_sample;
  const int64_t end = min(p.per_sample, (c + 1) * kChunk);
  const T* x = static_cast<const T*>(p.x);
  double acc = 0;  // sums in fp64: more accurate than PyTorch's fp32 sums, and memory-bound anyway
  for (int64_t j = c * kChunk + threadIdx.x; j < end; j += kThreads) {
    const int64_t i = base + j;
    acc += fabs(to_compute(x[i]) - real_at<T>(p, i));
  }
  const double total = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) p.norm_partials[b * p.chunks + c] = total;
}

template <typename T>
__device__ __forceinline__ typename Compute<T>::type g_at(const Params& p, int64_t i, typename Compute<T>::type norm) {
  using C = typename Compute<T>::type;
  const C g = (to_compute(static_cast<const T*>(p.fake)[i]) - real_at<T>(p, i)) / norm;
  return isfinite(g) ? g : C(0);  // norm 0 gives inf or nan
}

template <typename T>
__global__ void __launch_bounds__(kThreads) loss_kernel(const Params p) {
  using C = typename Compute<T>::type;
  __shared__ C norm;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  double partial = 0;  // the sample's norm from its chunk sums, in a fixed order
  for (int64_t k = threadIdx.x; k < p.chunks; k += kThreads) partial += p.norm_partials[b * p.chunks + k];
  const double s = block_sum<kThreads>(partial);
  if (threadIdx.x == 0) {
    norm = static_cast<C>(s / static_cast<double>(p.per_sample));
    if (c == 0) p.norm[b] = s / static_cast<double>(p.per_sample);
  }
  __syncthreads();
  const int64_t base = b * p.per_sample;
  const int64_t end = min(p.per_sample, (c + 1) * kChunk);
  double acc = 0;
  for (int64_t j = c * kChunk + threadIdx.x; j < end; j += kThreads) {
    const C g = g_at<T>(p, base + j, norm);
    acc += static_cast<double>(g) * g;
  }
  const double total = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) p.loss_partials[b * p.chunks + c] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const Params p, double inv_numel, bool loss_is_double) {
  using C = typename Compute<T>::type;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const C norm = static_cast<C>(p.norm[b]);
  const double upstream = loss_is_double ? *static_cast<const double*>(p.grad_loss)
                                         : static_cast<double>(*static_cast<const float*>(p.grad_loss));
  const C scale = static_cast<C>(upstream * inv_numel);
  const int64_t base = b * p.per_sample;
  const int64_t end = min(p.per_sample, (c + 1) * kChunk);
  T* grad = static_cast<T*>(p.grad);
  for (int64_t j = c * kChunk + threadIdx.x; j < end; j += kThreads) {
    grad[base + j] = from_compute<T>(g_at<T>(p, base + j, norm) * scale);
  }
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const Params p, double inv_numel, bool is_double) {
  double acc = 0;
  const int64_t n = p.batch * p.chunks;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) acc += p.loss_partials[k];
  const double total = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) {
    const double loss = 0.5 * total * inv_numel;
    if (is_double) *static_cast<double*>(p.loss) = loss;
    else *static_cast<float*>(p.loss) = static_cast<float>(loss);
  }
}

template <typename T>
cudaError_t launch(const Params& p, bool backward, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.batch));
  const double inv_numel = 1.0 / static_cast<double>(p.batch * p.per_sample);
  const bool is_double = p.dtype == DType::kFloat64;
  if (backward) {
    backward_kernel<T><<<grid, kThreads, 0, stream>>>(p, inv_numel, is_double);
  } else {
    norm_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    loss_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    finalize_kernel<<<1, kThreads, 0, stream>>>(p, inv_numel, is_double);
  }
  return cudaGetLastError();
}

cudaError_t launch_for_dtype(const Params& p, bool backward, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat16: return launch<__half>(p, backward, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, backward, stream);
    case DType::kFloat64: return launch<double>(p, backward, stream);
    default: return launch<float>(p, backward, stream);
  }
}

}  // namespace

cudaError_t launch_dmd_loss_cuda(const Params& p, cudaStream_t stream) { return launch_for_dtype(p, false, stream); }

cudaError_t launch_dmd_loss_backward_cuda(const Params& p, cudaStream_t stream) {
  return launch_for_dtype(p, true, stream);
}

}  // namespace dmd_loss
}  // namespace fewstep
