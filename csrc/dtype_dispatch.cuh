// Host-side template dispatch of the launchers: from the runtime DType of launchers.h to the element types
// the kernels are instantiated for, and from the `vectorize` flag to their load width.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "launchers.h"

namespace lora_kernels {

// Calls f(T{}) with T the element type of `t`.
template <typename F>
cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(T{}, TA{}) for an A in float32 or in x's type.
template <typename F>
cudaError_t with_types(DType x_dtype, DType a_dtype, F&& f) {
  if (a_dtype != DType::kFloat32 && a_dtype != x_dtype) return cudaErrorInvalidValue;
  return with_type(x_dtype, [&](auto t) {
    using T = decltype(t);
    if (a_dtype == DType::kFloat32) return f(T{}, float{});
    return f(T{}, T{});
  });
}

// Calls f(std::integral_constant<int, VEC>{}): VEC = 16 / sizeof(T) (16-byte loads of T) if vectorize, else 1.
template <typename T, typename F>
void with_vector_width(bool vectorize, F&& f) {
  if (vectorize) {
    f(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace lora_kernels
