// dropout_grad_a, the gradient of LoRA's A with dropout fused into the load of x:
//
//   grad_A (r, K) float32 = s · dybᵀ · dropout_p(x) = out_scale · Σ_m dyb[m, :]ᵀ ⊗ (x ⊙ keep)[m, :],
//   out_scale = s / (1 - p),  dyb = dy · B (M, r) float32, computed by cuBLAS beforehand
//
// so that the backward needs neither a dropped copy of x nor a stored mask: keep is
// lora_kernels::dropout_keep (philox.cuh), the Triton backend's mask bit for bit, regenerated in registers.
//
// Tiling (tile_staging.cuh): a block owns BR rows x 64 columns of grad_A and one split of the M reduction
// (blockIdx.z), walking its rows 32 at a time; it writes partial[z], and bindings.cpp sums the splits with
// one torch sum (deterministic, unlike atomics). No torch header: bindings.cpp calls launch_dropout_grad_a
// (launchers.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_dispatch.cuh"
#include "launchers.h"
#include "philox.cuh"
#include "tile_staging.cuh"

namespace lora_kernels {
namespace {

constexpr int kGradABK = 64;
constexpr int kGradABM = 32;

template <typename T, int BR, int VEC>
__global__ void __launch_bounds__(kThreads)
dropout_grad_a_kernel(const float* __restrict__ dyb, int64_t lddyb, const T* __restrict__ x, int64_t ldx,
                      float* __restrict__ partial, int64_t M, int64_t K, int64_t R, int64_t rows_per_split,
                      const int64_t* __restrict__ seed_ptr, int32_t threshold, float out_scale, bool has_dropout) {
  constexpr int BK = kGradABK;
  constexpr int BMR = kGradABM;  // reduction step over rows of x
  __shared__ float Sd[BMR * BR];  // Sd[m][j] = dyb[m, j0 + j]
  __shared__ float Sx[BMR * BK];  // Sx[m][k] = dropped x[m, k0 + k]

  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t m_end = M < m_begin + rows_per_split ? M : m_begin + rows_per_split;
  using Tile = MicroTile<BR, BK>;
  const int tx = threadIdx.x % Tile::TX;
  const int ty = threadIdx.x / Tile::TX;
  const uint64_t seed = load_seed(seed_ptr, has_dropout);
  float acc[Tile::TM][Tile::TN];
  zero_tile(acc);

  for (int64_t m0 = m_begin; m0 < m_end; m0 += BMR) {
    // rows >= m_end belong to the next split (or are past M): M' = m_end masks them out.
    stage_matrix<float, BMR, BR, BR, 1>(Sd, dyb, lddyb, m_end, R, m0, j0);
    stage_dropped_x<T, BMR, BK, VEC, BK, 1>(Sx, x, ldx, m_end, K, m0, k0, has_dropout, seed, threshold);
    __syncthreads();
    tile_fma<BMR, BR, BK, Tile>(Sd, Sx, acc, ty, tx);
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(blockIdx.z) * R * K;
  store_tile<Tile>(acc, ty, tx, j0, k0, R, K, [&](int64_t j, int64_t k, float v) { out[j * K + k] = v * out_scale; });
}

}  // namespace

#ifndef LORA_KERNELS_HOST_EMULATION  // tests/cuda_host_emulation/ runs the kernel above on the host, not launched
namespace {

// Narrow r tiles for small ranks (the common r = 8/16), so few FMAs are spent on padding.
int grad_a_block_r(int64_t R) { return R <= 16 ? 16 : (R <= 32 ? 32 : 64); }

template <typename T, int BR>
void grad_a_tile(const float* dyb, int64_t lddyb, const T* x, int64_t ldx, float* partial, int64_t M, int64_t K,
                 int64_t R, int64_t splits, int64_t rows_per_split, DropoutArgs d, float out_scale, bool vectorize,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(K, kGradABK)), static_cast<unsigned>(ceil_div(R, BR)),
                  static_cast<unsigned>(splits));
  with_vector_width<T>(vectorize, [&](auto vec) {
    dropout_grad_a_kernel<T, BR, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
        dyb, lddyb, x, ldx, partial, M, K, R, rows_per_split, d.seed, d.threshold, out_scale, d.has_dropout);
  });
}

}  // namespace

int64_t grad_a_row_step() { return kGradABM; }
int64_t grad_a_tiles(int64_t K, int64_t R) { return ceil_div(K, kGradABK) * ceil_div(R, grad_a_block_r(R)); }

cudaError_t launch_dropout_grad_a(DType x_dtype, const float* dyb, int64_t lddyb, const void* x, int64_t ldx,
                                  float* partial, int64_t M, int64_t K, int64_t R, int64_t splits,
                                  int64_t rows_per_split, DropoutArgs d, float out_scale, bool vectorize,
                                  cudaStream_t stream) {
  if (M <= 0 || K <= 0 || R <= 0) return cudaSuccess;
  if (splits < 1 || rows_per_split % kGradABM != 0) return cudaErrorInvalidValue;
  return with_type(x_dtype, [&](auto t) {
    using T = decltype(t);
    const T* xp = static_cast<const T*>(x);
    switch (grad_a_block_r(R)) {
      case 16:
        grad_a_tile<T, 16>(dyb, lddyb, xp, ldx, partial, M, K, R, splits, rows_per_split, d, out_scale, vectorize,
                           stream);
        break;
      case 32:
        grad_a_tile<T, 32>(dyb, lddyb, xp, ldx, partial, M, K, R, splits, rows_per_split, d, out_scale, vectorize,
                           stream);
        break;
      default:
        grad_a_tile<T, 64>(dyb, lddyb, xp, ldx, partial, M, K, R, splits, rows_per_split, d, out_scale, vectorize,
                           stream);
    }
    return cudaGetLastError();
  });
}
#endif  // LORA_KERNELS_HOST_EMULATION

}  // namespace lora_kernels
