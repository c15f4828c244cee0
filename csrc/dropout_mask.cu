// dropout_mask: the (M, K) keep-mask itself, as bool, for rows [row_start, row_start + M) of a logical
// (*, K) tensor:
//
//   out[m, k] = dropout_keep(seed, row_start + m, k, K, threshold)
//
// The fused kernels never store the mask; this one exists so that tests (and debugging) can compare the
// CUDA backend's mask with the Triton backend's (lora_kernels/ops/dropout.py) on the device, element for
// element, including rows whose Philox counters lie beyond 2^32. A grid-stride loop, one Philox call per
// element. No torch header: bindings.cpp calls launch_dropout_mask (launchers.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launchers.h"
#include "philox.cuh"

namespace lora_kernels {
namespace {

__global__ void dropout_mask_kernel(bool* __restrict__ out, int64_t M, int64_t K, int64_t row_start,
                                    const int64_t* __restrict__ seed_ptr, int32_t threshold) {
  const uint64_t seed = static_cast<uint64_t>(seed_ptr[0]);
  const int64_t n = M * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / K;
    out[i] = dropout_keep(seed, row_start + m, i - m * K, K, threshold);
  }
}

}  // namespace

#ifndef LORA_KERNELS_HOST_EMULATION  // tests/cuda_host_emulation/ runs the kernel above on the host, not launched
namespace {

constexpr int kMaskThreads = 256;  // any block size works (grid-stride loop)
constexpr int64_t kMaskMaxBlocks = 65535;

}  // namespace

cudaError_t launch_dropout_mask(bool* out, int64_t M, int64_t K, int64_t row_start, DropoutArgs d,
                                cudaStream_t stream) {
  if (M <= 0 || K <= 0) return cudaSuccess;
  const int64_t blocks = std::min(ceil_div(M * K, kMaskThreads), kMaskMaxBlocks);
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kMaskThreads, 0, stream>>>(out, M, K, row_start, d.seed,
                                                                                   d.threshold);
  return cudaGetLastError();
}
#endif  // LORA_KERNELS_HOST_EMULATION

}  // namespace lora_kernels
