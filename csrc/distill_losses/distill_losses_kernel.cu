// CUDA kernels of the distillation losses besides DMD (see distill_losses.h). No torch headers.
// Losses, two launches: per-chunk fp64 sums of the elementwise term (grid: chunks x samples), then
// one block that reduces them per sample and overall. Backward and the teacher step: one
// elementwise launch. Every sum has a fixed order (threads, a fixed tree, chunks in index order),
// so results do not depend on scheduling. Per-sample coefficients (schedule lookups, boundary
// scalings) are computed by every thread from the sample's timesteps: a few flops, no sync.

#include <cmath>
#include <cstdint>

#include "distill_losses/distill_losses_cuda.h"
#include "fewstep/block_reduce.cuh"
#include "fewstep/cuda_dtype.cuh"

namespace fewstep {
namespace distill_losses {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ typename Compute<T>::type load(const void* data, int64_t i) {
  return to_compute(static_cast<const T*>(data)[i]);
}

// e = u - v (distill_losses.h): A - C unless kLcd.
template <typename T, bool kLcd>
struct Difference {
  using C = typename Compute<T>::type;
  ConsistencyFormIn<C> u, v;

  __device__ explicit Difference(const SampleCoefficients& k) : u(k.a), v(k.c) {}

  __device__ __forceinline__ C operator()(const RegressionParams& p, int64_t i) const {
    if (!kLcd) return load<T>(p.a, i) - load<T>(p.c, i);
    return u(load<T>(p.a, i), load<T>(p.b, i)) - v(load<T>(p.c, i), load<T>(p.d, i));
  }
};

// Only the LCD instantiations compile the schedule lookups.
template <bool kLcd>
__device__ __forceinline__ SampleCoefficients coefficients(const RegressionParams& p, int64_t b) {
  return kLcd ? sample_coefficients(p, b) : SampleCoefficients{{1.0, 0.0, 0.0, 0.0}, {1.0, 0.0, 0.0, 0.0}, 1.0};
}

// The [begin, end) element range of chunk blockIdx.x of sample blockIdx.y.
struct ChunkRange {
  int64_t begin, end;
};

__device__ __forceinline__ ChunkRange chunk_range(int64_t row_size) {
  const int64_t base = static_cast<int64_t>(blockIdx.y) * row_size, c = blockIdx.x;
  return {base + c * kChunk, base + min(row_size, (c + 1) * kChunk)};
}

template <typename T, bool kLcd>
__global__ void __launch_bounds__(kThreads) regression_partials_kernel(const RegressionParams p) {
  using C = typename Compute<T>::type;
  const Difference<T, kLcd> diff(coefficients<kLcd>(p, blockIdx.y));
  const C huber_c = static_cast<C>(p.huber_c);
  const ChunkRange r = chunk_range(p.per_sample);
  double acc = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) acc += distance(p.distance, diff(p, i), huber_c);
  const double total = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) p.partials[blockIdx.y * p.chunks + blockIdx.x] = total;
}

// One block: the chunks of each sample are summed by the whole block when there are fewer samples
// than warps (few samples, many chunks), else by one warp per sample (lanes, then shuffles); then
// the block sums weight_b mean_b over the samples. The order depends on the shape only.
__global__ void __launch_bounds__(kThreads) regression_finalize_kernel(const RegressionParams p) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  if (p.batch < kWarps) {
    for (int64_t b = 0; b < p.batch; ++b) {
      double s = 0;
      for (int64_t k = threadIdx.x; k < p.chunks; k += kThreads) s += p.partials[b * p.chunks + k];
      s = block_sum<kThreads>(s);
      if (threadIdx.x == 0) p.sample_means[b] = s / static_cast<double>(p.per_sample);
    }
  } else {
    for (int64_t b = warp; b < p.batch; b += kWarps) {
      double s = 0;
      for (int64_t k = lane; k < p.chunks; k += 32) s += p.partials[b * p.chunks + k];
      for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
      if (lane == 0) p.sample_means[b] = s / static_cast<double>(p.per_sample);
    }
  }
  __syncthreads();  // sample_means written by this block are visible to all its threads
  double acc = 0;
  for (int64_t b = threadIdx.x; b < p.batch; b += kThreads) {
    acc += (p.weight.data != nullptr ? p.weight.at(b) : 1.0) * p.sample_means[b];
  }
  const double total = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) {
    const double loss = total / static_cast<double>(p.batch);
    if (p.dtype == DType::kFloat64) *static_cast<double*>(p.loss) = loss;
    else *static_cast<float*>(p.loss) = static_cast<float>(loss);
  }
}

__device__ __forceinline__ double read_grad_loss(const void* grad_loss, DType dtype) {
  return dtype == DType::kFloat64 ? *static_cast<const double*>(grad_loss)
                                  : static_cast<double>(*static_cast<const float*>(grad_loss));
}

template <typename T, bool kLcd>
__global__ void __launch_bounds__(kThreads) regression_backward_kernel(const RegressionParams p) {
  using C = typename Compute<T>::type;
  const int64_t b = blockIdx.y;
  const SampleCoefficients k = coefficients<kLcd>(p, b);
  const Difference<T, kLcd> diff(k);
  const C huber_c = static_cast<C>(p.huber_c);
  const double weight = p.weight.data != nullptr ? p.weight.at(b) : 1.0;
  const C factor = static_cast<C>(read_grad_loss(p.grad_loss, p.dtype) * weight * k.grad /
                                  static_cast<double>(p.batch * p.per_sample));
  T* grad = static_cast<T*>(p.grad);
  const ChunkRange r = chunk_range(p.per_sample);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    grad[i] = from_compute<T>(factor * distance_derivative(p.distance, diff(p, i), huber_c));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) teacher_step_kernel(const TeacherStepParams p) {
  using C = typename Compute<T>::type;
  const TeacherCoefficients k = teacher_coefficients(p, blockIdx.y);
  const C kx = static_cast<C>(k.x), kc = static_cast<C>(k.cond), ku = static_cast<C>(k.uncond);
  T* out = static_cast<T*>(p.out);
  const ChunkRange r = chunk_range(p.per_sample);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    out[i] = from_compute<T>(kx * load<T>(p.x_t, i) + kc * load<T>(p.cond, i) + ku * load<T>(p.uncond, i));
  }
}

// Chunks [0, real_chunks) of the real logits, then the fake logits' chunks.
template <typename T>
__global__ void __launch_bounds__(kThreads) gan_partials_kernel(const GanParams p) {
  using C = typename Compute<T>::type;
  const int64_t task = blockIdx.x;
  const bool real = task < p.real_chunks;
  const int64_t c = real ? task : task - p.real_chunks, numel = real ? p.real_numel : p.fake_numel;
  const void* logits = real ? p.real : p.fake;
  const C sign = static_cast<C>(real ? -1.0 : p.fake_sign);
  double acc = 0;
  for (int64_t i = c * kChunk + threadIdx.x; i < min(numel, (c + 1) * kChunk); i += kThreads) {
    acc += softplus(sign * load<T>(logits, i));
  }
  const double total = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) p.partials[task] = total;
}

__global__ void __launch_bounds__(kThreads) gan_finalize_kernel(const GanParams p) {
  double real = 0, fake = 0;
  for (int64_t k = threadIdx.x; k < p.real_chunks; k += kThreads) real += p.partials[k];
  for (int64_t k = threadIdx.x; k < p.fake_chunks; k += kThreads) fake += p.partials[p.real_chunks + k];
  const double real_sum = block_sum<kThreads>(real);
  const double fake_sum = block_sum<kThreads>(fake);
  if (threadIdx.x == 0) {
    const double loss = (p.real_chunks > 0 ? real_sum / static_cast<double>(p.real_numel) : 0.0) +
                        fake_sum / static_cast<double>(p.fake_numel);
    if (p.dtype == DType::kFloat64) *static_cast<double*>(p.loss) = loss;
    else *static_cast<float*>(p.loss) = static_cast<float>(loss);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softplus_backward_kernel(const SoftplusBackwardParams p) {
  using C = typename Compute<T>::type;
  const C scale = static_cast<C>(read_grad_loss(p.grad_loss, p.dtype) * p.sign / static_cast<double>(p.numel));
  const C sign = static_cast<C>(p.sign);
  T* grad = static_cast<T*>(p.grad);
  const ChunkRange r = chunk_range(p.numel);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    grad[i] = from_compute<T>(scale * sigmoid(sign * load<T>(p.logits, i)));
  }
}

// Calls f(T{}) with T the CUDA element type of `dtype`.
template <class F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat64: f(double{}); break;
    default: f(float{}); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_regression_loss_cuda(const RegressionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.batch));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.lcd) regression_partials_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
    else regression_partials_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
    regression_finalize_kernel<<<1, kThreads, 0, stream>>>(p);
  });
}

cudaError_t launch_regression_loss_backward_cuda(const RegressionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.batch));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.lcd) regression_backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
    else regression_backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  });
}

cudaError_t launch_teacher_step_cuda(const TeacherStepParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.batch));
  return dispatch_dtype(p.dtype, [&](auto tag) { teacher_step_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(p); });
}

cudaError_t launch_gan_loss_cuda(const GanParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(p.real_chunks + p.fake_chunks);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    gan_partials_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(p);
    gan_finalize_kernel<<<1, kThreads, 0, stream>>>(p);
  });
}

cudaError_t launch_softplus_mean_backward_cuda(const SoftplusBackwardParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.chunks), 1);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    softplus_backward_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(p);
  });
}

}  // namespace distill_losses
}  // namespace fewstep
