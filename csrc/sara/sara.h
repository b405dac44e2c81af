// SaRA sparse updates: torch-free parameter structs shared by the CPU and CUDA kernels.
//
// A selection marks the trainable entries of one parameter tensor (flattened, row-major).
// It is stored in one of two formats, whichever is smaller for its density:
//   kIndices: k sorted int32 dense indices;
//   kBitmask: ceil(n/32) 32-bit words (bit b of word w = element 32w+b) plus, for each chunk
//             of kChunk elements, the compact position of its first selected element.
// The selected entries of a tensor occupy k consecutive slots ("compact" order = ascending
// dense index) of flat fp32 buffers: gradient, Adam moments and, for fp16/bf16 weights,
// fp32 master values.
#pragma once

#include <cstdint>

#include "fewstep/dtype.h"

namespace fewstep {
namespace sara {

constexpr int64_t kChunk = 1024;       // elements per bitmask chunk = 32 words
constexpr int64_t kUnitEntries = 256;  // compact entries per work unit of an index selection

enum class Format : uint8_t { kIndices = 0, kBitmask = 1 };

// Columns of the int64 layout table [num_tensors, kLayoutCols] built by fewstep.finetune.
enum LayoutCol : int {
  kColFormat = 0,        // Format
  kColNumel = 1,         // n, elements of the parameter
  kColK = 2,             // selected entries
  kColCompactBegin = 3,  // first slot in grad / exp_avg / exp_avg_sq
  kColMasterBegin = 4,   // first slot in master, -1 when the weight itself is fp32
  kColSelBegin = 5,      // first int32 of the indices or bitmask words in `selection`
  kColChunkBegin = 6,    // first int32 in `chunk_offsets` (bitmask only)
  kLayoutCols = 7,
};

// Work units: one warp (CUDA) or one task (CPU) handles kChunk dense elements of a bitmask
// selection or kUnitEntries compact entries of an index selection.
inline int64_t num_units(Format f, int64_t numel, int64_t k) {
  return f == Format::kBitmask ? (numel + kChunk - 1) / kChunk : (k + kUnitEntries - 1) / kUnitEntries;
}

// out[compact] += scale * grad[selected], for one tensor.
struct GatherParams {
  const void* grad;      // numel elements of `grad_dtype`
  DType grad_dtype;
  float* out;            // k floats
  const int32_t* selection;
  const int32_t* chunk_offsets;
  Format format;
  int64_t numel;
  int64_t k;
  float scale;
};

// One multi-tensor launch covers at most this many tensors (the table lives in kernel
// parameter space, 32 KiB since CUDA 12.1); more tensors take several launches.
constexpr int kMaxTensorsPerLaunch = 640;

struct TensorTable {
  int num_tensors;
  int64_t unit_begin[kMaxTensorsPerLaunch + 1];  // prefix sum of num_units, unit_begin[0] = 0
  void* weight[kMaxTensorsPerLaunch];
  int32_t numel[kMaxTensorsPerLaunch];
  int32_t k[kMaxTensorsPerLaunch];
  int32_t compact_begin[kMaxTensorsPerLaunch];
  int32_t master_begin[kMaxTensorsPerLaunch];
  int32_t sel_begin[kMaxTensorsPerLaunch];
  int32_t chunk_begin[kMaxTensorsPerLaunch];
  DType dtype[kMaxTensorsPerLaunch];
  Format format[kMaxTensorsPerLaunch];
};

// Decoupled-weight-decay Adam (torch.optim.AdamW's arithmetic) on the selected entries:
//   x  = master or weight;  x *= 1 - lr*wd
//   m += (1-beta1) (g - m);  v = beta2 v + (1-beta2) g^2
//   x -= step_size * m / (sqrt(v) / bc2_sqrt + eps);  weight = cast(x)
struct AdamWParams {
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* master;
  const int32_t* selection;
  const int32_t* chunk_offsets;
  float beta2, eps;
  float one_minus_beta1, one_minus_beta2;  // rounded from double, as torch's scalar arguments are
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
};

}  // namespace sara
}  // namespace fewstep
