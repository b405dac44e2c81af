// CUDA kernels of SaRA's sparse gradient gather and sparse AdamW. No torch headers.
//
// One warp handles one work unit. For a bitmask unit (1024 dense elements = 32 words) lane j
// loads word j and the warp scans the popcounts: an entry's compact slot is its chunk's offset
// + the set bits of the words before it + the set bits below it in its word.
#include <cstdint>

#include "fewstep/cuda_dtype.cuh"
#include "sara/sara_cuda.h"

namespace fewstep {
namespace sara {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Weights and gradients of one launch have different dtypes: chosen per tensor at run time.
__device__ __forceinline__ float load_as_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return to_compute(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return to_compute(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(base)[i] = from_compute<__half>(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = from_compute<__nv_bfloat16>(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// Visits every selected entry (dense index, compact slot) of `unit`: load(dense, slot) for up to
// kBatch entries per lane first, then apply(dense, slot, loaded) for each, so every lane has
// several independent loads in flight. Slots are checked against k and dense indices against
// numel, so an inconsistent selection cannot touch memory out of bounds. A bitmask unit is first
// compacted into the warp's shared buffer (the chunk-local offsets of its set bits, in order), so
// that the 32 lanes then work on consecutive compact slots: the compact buffers are read coalesced.
constexpr int kBatch = 4;

template <class Load, class Apply>
__device__ __forceinline__ void for_each_selected(Format format, const int32_t* selection,
                                                  const int32_t* chunk_offsets, int64_t numel, int64_t k,
                                                  int64_t unit, uint16_t* warp_buf, Load&& load, Apply&& apply) {
  const int lane = threadIdx.x & 31;
  int64_t first_slot;
  int total;
  if (format == Format::kIndices) {
    first_slot = unit * kUnitEntries;
    total = static_cast<int>(min(kUnitEntries, k - first_slot));
  } else {
    const int64_t num_words = (numel + 31) / 32;
    const int64_t word_index = unit * 32 + lane;
    uint32_t word = 0;
    if (word_index < num_words) {
      word = static_cast<uint32_t>(selection[word_index]);
      const int tail = static_cast<int>(numel & 31);
      if (word_index == num_words - 1 && tail != 0) word &= (1u << tail) - 1u;
    }
    const int count = __popc(word);
    int inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(kFullMask, inclusive, d);
      if (lane >= d) inclusive += y;
    }
    int pos = inclusive - count;
    for (uint32_t bits = word; bits != 0; bits &= bits - 1u) {
      warp_buf[pos++] = static_cast<uint16_t>(lane * 32 + __ffs(bits) - 1);
    }
    __syncwarp();
    first_slot = chunk_offsets[unit];
    total = __shfl_sync(kFullMask, inclusive, 31);
    if (first_slot < 0) total = 0;
    total = static_cast<int>(min(static_cast<int64_t>(total), k - first_slot));
  }
  using Loaded = decltype(load(int64_t(0), int64_t(0)));
  for (int base = 0; base < total; base += 32 * kBatch) {
    int64_t dense[kBatch];
    bool ok[kBatch];
    Loaded values[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int e = base + j * 32 + lane;
      ok[j] = e < total;
      if (ok[j]) {
        dense[j] = format == Format::kIndices ? selection[first_slot + e] : unit * kChunk + warp_buf[e];
        ok[j] = dense[j] >= 0 && dense[j] < numel;
        if (ok[j]) values[j] = load(dense[j], first_slot + e);
      }
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (ok[j]) apply(dense[j], first_slot + base + j * 32 + lane, values[j]);
    }
  }
}

struct GatherLoaded { float acc, g; };
struct AdamLoaded { float g, m, v, x; };

__global__ void __launch_bounds__(kThreads) gather_kernel(const GatherParams p, int64_t num_units) {
  __shared__ uint16_t buf[kWarpsPerBlock][kChunk];
  const int64_t unit = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / 32;
  if (unit >= num_units) return;  // warp-uniform
  for_each_selected(
      p.format, p.selection, p.chunk_offsets, p.numel, p.k, unit, buf[threadIdx.x / 32],
      [&](int64_t dense, int64_t slot) { return GatherLoaded{p.out[slot], load_as_float(p.grad, p.grad_dtype, dense)}; },
      [&](int64_t, int64_t slot, const GatherLoaded& l) { p.out[slot] = l.acc + p.scale * l.g; });
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const AdamWParams p, const TensorTable t) {
  __shared__ uint16_t buf[kWarpsPerBlock][kChunk];
  const int64_t unit = blockIdx.x * (int64_t)kWarpsPerBlock + threadIdx.x / 32;
  if (unit >= t.unit_begin[t.num_tensors]) return;  // warp-uniform
  int lo = 0, hi = t.num_tensors - 1;  // last tensor whose first unit is <= unit
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.unit_begin[mid] <= unit) lo = mid; else hi = mid - 1;
  }
  const int i = lo;
  const int64_t cb = t.compact_begin[i], mb = t.master_begin[i];
  void* const weight = t.weight[i];
  const DType dt = t.dtype[i];
  for_each_selected(
      t.format[i], p.selection + t.sel_begin[i], p.chunk_offsets + t.chunk_begin[i], t.numel[i], t.k[i],
      unit - t.unit_begin[i], buf[threadIdx.x / 32],
      [&](int64_t dense, int64_t slot) {
        const int64_t c = cb + slot;
        return AdamLoaded{p.grad[c], p.exp_avg[c], p.exp_avg_sq[c],
                          mb >= 0 ? p.master[mb + slot] : load_as_float(weight, dt, dense)};
      },
      [&](int64_t dense, int64_t slot, const AdamLoaded& l) {
        const int64_t c = cb + slot;
        const float g = l.g;
        const float x0 = l.x * p.decay;
        const float m = l.m + p.one_minus_beta1 * (g - l.m);
        const float v = l.v * p.beta2 + p.one_minus_beta2 * g * g;
        const float x = x0 - p.step_size * (m / (sqrtf(v) / p.bc2_sqrt + p.eps));
        p.exp_avg[c] = m;
        p.exp_avg_sq[c] = v;
        if (mb >= 0) p.master[mb + slot] = x;
        store_from_float(weight, dt, dense, x);
      });
}

int64_t blocks_for(int64_t units) { return (units + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace

cudaError_t launch_gather_cuda(const GatherParams& p, cudaStream_t stream) {
  const int64_t units = num_units(p.format, p.numel, p.k);
  if (units == 0) return cudaSuccess;
  gather_kernel<<<blocks_for(units), kThreads, 0, stream>>>(p, units);
  return cudaGetLastError();
}

cudaError_t launch_adamw_cuda(const AdamWParams& p, const TensorTable& table, cudaStream_t stream) {
  const int64_t units = table.unit_begin[table.num_tensors];
  if (units == 0) return cudaSuccess;
  adamw_kernel<<<blocks_for(units), kThreads, 0, stream>>>(p, table);
  return cudaGetLastError();
}

}  // namespace sara
}  // namespace fewstep
