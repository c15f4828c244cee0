// lora_dx_epilogue, the LoRA term of grad_x added in place, with the dropout mask applied on the way out:
//
//   grad_x (M, K) += s · (dyb · A) ⊙ keep / (1 - p) = out_scale · keep ⊙ (dyb · A),   out_scale = s / (1 - p)
//
// where grad_x already holds dy · W (cuBLAS) and dyb = dy · B (M, r) float32. keep is
// lora_kernels::dropout_keep (philox.cuh), the Triton backend's mask bit for bit, regenerated in registers;
// a dropped element of grad_x is not written at all.
//
// Tiling (tile_staging.cuh): a block owns 64 x 64 of grad_x and walks r in steps of 16, staging dyb
// transposed (r-major) and the matching rows of A. No torch header: bindings.cpp calls
// launch_lora_dx_epilogue (launchers.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_dispatch.cuh"
#include "launchers.h"
#include "philox.cuh"
#include "tile_staging.cuh"

namespace lora_kernels {
namespace {

constexpr int kDxBM = 64;
constexpr int kDxBK = 64;
constexpr int kDxBR = 16;

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_dx_epilogue_kernel(T* __restrict__ grad_x, int64_t ldg, const float* __restrict__ dyb, int64_t lddyb,
                        const TA* __restrict__ A, int64_t lda, int64_t M, int64_t K, int64_t R,
                        const int64_t* __restrict__ seed_ptr, int32_t threshold, float out_scale, bool has_dropout) {
  constexpr int BM = kDxBM, BK = kDxBK, BR = kDxBR;
  constexpr int LDD = BM + 1;   // Sd[j][m], padded: the store transposes
  __shared__ float Sd[BR * LDD];
  __shared__ float Sa[BR * BK];  // Sa[j][k] = A[j, k0 + k]

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;
  using Tile = MicroTile<BM, BK>;
  const int tx = threadIdx.x % Tile::TX;
  const int ty = threadIdx.x / Tile::TX;
  const uint64_t seed = load_seed(seed_ptr, has_dropout);
  float acc[Tile::TM][Tile::TN];
  zero_tile(acc);

  for (int64_t r0 = 0; r0 < R; r0 += BR) {
    stage_matrix<float, BM, BR, 1, LDD>(Sd, dyb + r0, lddyb, M, R - r0, m0, 0);
    stage_matrix<TA, BR, BK, BK, 1>(Sa, A + r0 * lda, lda, R - r0, K, 0, k0);
    __syncthreads();
    tile_fma<BR, LDD, BK, Tile>(Sd, Sa, acc, ty, tx);
    __syncthreads();
  }
  store_tile<Tile>(acc, ty, tx, m0, k0, M, K, [&](int64_t m, int64_t k, float v) {
    if (has_dropout && !dropout_keep(seed, m, k, K, threshold)) return;  // dropped: grad_x unchanged
    T* g = grad_x + m * ldg + k;
    *g = from_float<T>(to_float(*g) + v * out_scale);
  });
}

}  // namespace

#ifndef LORA_KERNELS_HOST_EMULATION  // tests/cuda_host_emulation/ runs the kernel above on the host, not launched
int64_t dx_grid_y(int64_t K) { return ceil_div(K, kDxBK); }

cudaError_t launch_lora_dx_epilogue(DType g_dtype, DType a_dtype, void* grad_x, int64_t ldg, const float* dyb,
                                    int64_t lddyb, const void* A, int64_t lda, int64_t M, int64_t K, int64_t R,
                                    DropoutArgs d, float out_scale, cudaStream_t stream) {
  if (M <= 0 || K <= 0 || R <= 0) return cudaSuccess;
  return with_types(g_dtype, a_dtype, [&](auto t, auto ta) {
    using T = decltype(t);
    using TA = decltype(ta);
    const dim3 grid(static_cast<unsigned>(ceil_div(M, kDxBM)), static_cast<unsigned>(ceil_div(K, kDxBK)));
    lora_dx_epilogue_kernel<T, TA><<<grid, kThreads, 0, stream>>>(static_cast<T*>(grad_x), ldg, dyb, lddyb,
                                                                  static_cast<const TA*>(A), lda, M, K, R, d.seed,
                                                                  d.threshold, out_scale, d.has_dropout);
    return cudaGetLastError();
  });
}
#endif  // LORA_KERNELS_HOST_EMULATION

}  // namespace lora_kernels
