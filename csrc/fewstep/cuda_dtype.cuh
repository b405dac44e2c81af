// Element conversions shared by fewstep's CUDA kernels (CUDA toolkit only, no torch): fp16 and
// bf16 compute in fp32, fp32 in fp32, fp64 in fp64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fewstep {

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Compute<T>::type to_compute(T v) { return v; }
template <> __device__ __forceinline__ float to_compute<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_compute<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_compute(typename Compute<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace fewstep
