// The element types fewstep's kernels handle, as torch-free params structs carry them.
#pragma once

#include <cstdint>

namespace fewstep {

enum class DType : uint8_t { kFloat16, kBFloat16, kFloat32, kFloat64 };

}  // namespace fewstep
