// dropout_shrink, the forward LoRA shrink with dropout fused into the load of x:
//
//   xa (M, r) float32 = dropout_p(x) · Aᵀ = keep_scale · (x ⊙ keep) · Aᵀ,   keep_scale = 1 / (1 - p)
//
// so that the LoRA forward needs neither a dropped copy of x nor a stored mask: keep is
// lora_kernels::dropout_keep (philox.cuh), the Triton backend's mask bit for bit, regenerated in registers.
// cuBLAS (called from Python) does the big GEMMs; xa is the small (M, r) product that feeds B.
//
// Tiling (tile_staging.cuh): a block owns BM rows of x x BR columns of xa and walks K in steps of 32,
// staging the dropped x tile transposed (k-major) and the matching A tile. No torch header: the checks,
// allocation and stream are in bindings.cpp, which calls launch_dropout_shrink (launchers.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_dispatch.cuh"
#include "launchers.h"
#include "philox.cuh"
#include "tile_staging.cuh"

namespace lora_kernels {
namespace {

constexpr int kShrinkBK = 32;

template <typename T, typename TA, int BM, int BR, int VEC>
__global__ void __launch_bounds__(kThreads)
dropout_shrink_kernel(const T* __restrict__ x, int64_t ldx, const TA* __restrict__ A, int64_t lda,
                      float* __restrict__ xa, int64_t M, int64_t K, int64_t R, const int64_t* __restrict__ seed_ptr,
                      int32_t threshold, float keep_scale, bool has_dropout) {
  constexpr int BK = kShrinkBK;
  constexpr int LDX = BM + 1;  // Sx[k][m], padded against bank conflicts on the transposing store
  constexpr int LDA_S = BR + 1;
  __shared__ float Sx[BK * LDX];
  __shared__ float Sa[BK * LDA_S];

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  using Tile = MicroTile<BM, BR>;
  const int tx = threadIdx.x % Tile::TX;
  const int ty = threadIdx.x / Tile::TX;
  const uint64_t seed = load_seed(seed_ptr, has_dropout);
  float acc[Tile::TM][Tile::TN];
  zero_tile(acc);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    stage_dropped_x<T, BM, BK, VEC, 1, LDX>(Sx, x, ldx, M, K, m0, k0, has_dropout, seed, threshold);
    stage_matrix<TA, BR, BK, 1, LDA_S>(Sa, A, lda, R, K, j0, k0);  // Sa[k][j] = A[j0 + j, k0 + k]
    __syncthreads();
    tile_fma<BK, LDX, LDA_S, Tile>(Sx, Sa, acc, ty, tx);
    __syncthreads();
  }
  store_tile<Tile>(acc, ty, tx, m0, j0, M, R,
                   [&](int64_t m, int64_t col, float v) { xa[m * R + col] = v * keep_scale; });
}

}  // namespace

#ifndef LORA_KERNELS_HOST_EMULATION  // tests/cuda_host_emulation/ runs the kernel above on the host, not launched
namespace {

// Narrow r tiles for small ranks (the common r = 8/16), so few FMAs are spent on padding.
int shrink_block_r(int64_t R) { return R <= 16 ? 16 : (R <= 32 ? 32 : 64); }

template <typename T, typename TA, int BM, int BR>
void shrink_tile(const T* x, int64_t ldx, const TA* A, int64_t lda, float* xa, int64_t M, int64_t K, int64_t R,
                 DropoutArgs d, float keep_scale, bool vectorize, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(M, BM)), static_cast<unsigned>(ceil_div(R, BR)));
  with_vector_width<T>(vectorize, [&](auto vec) {
    dropout_shrink_kernel<T, TA, BM, BR, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
        x, ldx, A, lda, xa, M, K, R, d.seed, d.threshold, keep_scale, d.has_dropout);
  });
}

}  // namespace

int64_t shrink_grid_y(int64_t R) { return ceil_div(R, shrink_block_r(R)); }

cudaError_t launch_dropout_shrink(DType x_dtype, DType a_dtype, const void* x, int64_t ldx, const void* A,
                                  int64_t lda, float* xa, int64_t M, int64_t K, int64_t R, DropoutArgs d,
                                  float keep_scale, bool vectorize, cudaStream_t stream) {
  if (M <= 0 || K <= 0 || R <= 0) return cudaSuccess;
  return with_types(x_dtype, a_dtype, [&](auto t, auto ta) {
    using T = decltype(t);
    using TA = decltype(ta);
    const T* xp = static_cast<const T*>(x);
    const TA* ap = static_cast<const TA*>(A);
    switch (shrink_block_r(R)) {
      case 16:
        shrink_tile<T, TA, 128, 16>(xp, ldx, ap, lda, xa, M, K, R, d, keep_scale, vectorize, stream);
        break;
      case 32:
        shrink_tile<T, TA, 128, 32>(xp, ldx, ap, lda, xa, M, K, R, d, keep_scale, vectorize, stream);
        break;
      default:
        shrink_tile<T, TA, 64, 64>(xp, ldx, ap, lda, xa, M, K, R, d, keep_scale, vectorize, stream);
    }
    return cudaGetLastError();
  });
}
#endif  // LORA_KERNELS_HOST_EMULATION

}  // namespace lora_kernels
