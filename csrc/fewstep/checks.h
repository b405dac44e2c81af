// Input checks shared by every op's torch glue. Each failure names the argument, what was
// expected and what was given; TORCH_CHECK_TYPE/VALUE surface as Python TypeError/ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <charconv>
#include <cmath>
#include <string>

#include "fewstep/dtype.h"

namespace fewstep {

// Python's spelling of a dtype, so C++ and Python checks print the same messages.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return c10::toString(t);
  }
}

// Shortest round-trip spelling of a double ("0.5", "inf", "nan"), as Python prints floats.
inline std::string double_repr(double v) {
  char buf[32];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, res.ptr);
}

// The kernels' DType of a floating tensor; float64 only where `allow_double`. `name()` gives the
// argument's name for the error and is called only on failure (hot loops pass a lambda).
template <class Name>
DType to_dtype_named(at::ScalarType t, const Name& name, bool allow_double = true) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble:
      if (allow_double) return DType::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, name(), ": expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32'",
                       allow_double ? ", 'torch.float64']" : "]", ", got ", dtype_name(t));
  }
}

inline DType to_dtype(at::ScalarType t, const char* name, bool allow_double = true) {
  return to_dtype_named(t, [name] { return name; }, allow_double);
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got an undefined tensor");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, name,
                   ": expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32', 'torch.float64'], got ",
                   dtype_name(dt));
  TORCH_CHECK_VALUE(t.numel() > 0, name, ": expected a non-empty tensor, got shape ", t.sizes());
}

// `t` must have the shape, dtype and device of `ref`.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (the shape of ",
                    ref_name, "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", dtype_name(ref.scalar_type()),
                   " (the dtype of ", ref_name, "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ",
                    ref_name, "), got ", t.device());
}

inline void check_like(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  if (t.has_value()) check_like(*t, name, ref, ref_name);
}

inline void check_finite(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, ": expected a finite number, got ", double_repr(v));
}

}  // namespace fewstep
