// The dropout-fused LoRA side products of lora_kernels' hybrid CUDA backend (cuBLAS, called from
// Python, does the big GEMMs; these kernels do everything that touches the dropout mask):
//
//   dropout_shrink    xa     = dropout_p(x) · Aᵀ                       (M, r)  forward
//   dropout_grad_a    grad_A = s · dyBᵀ · dropout_p(x)                  (r, K)  backward
//   lora_dx_epilogue  grad_x += s · (dyB · A) ⊙ keep / (1-p)            (M, K)  backward, in place
//   dropout_mask      the (M, K) keep-mask itself, for tests
//
// The mask is lora_kernels::dropout_keep (philox.cuh), bit-identical to the Triton backend's
// (ops/dropout.py), generated in registers and never stored. (These kernels make one Philox call per
// element and use one of its four words; the Triton kernels use all four.)
//
// This file deliberately includes no torch header: argument checks, allocation, the stream and the
// Python binding are in bindings.cpp, which calls the launchers declared in lora_dropout.h.
//
// All three GEMM-shaped kernels share one scheme: a 256-thread block owns an output tile, stages
// float32 operand tiles (dropout already applied, inputs converted) in shared memory and
// accumulates a TM x TN register micro-tile per thread with FMAs in float32. The shapes involved
// have one small dimension (r <= a few hundred), so this SIMT scheme is expected to be bound by memory
// bandwidth and Philox, not by FMAs, at the ranks LoRA uses (not yet measured on a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lora_dropout.h"
#include "philox.cuh"

namespace lora_kernels {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC consecutive elements of a row as float32; VEC > 1 requires a (sizeof(T) * VEC)-aligned address.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* ptr, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(ptr[0]);
  } else {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = to_float(pack.v[v]);
  }
}

__device__ __forceinline__ uint64_t load_seed(const int64_t* seed_ptr, bool has_dropout) {
  return has_dropout ? static_cast<uint64_t>(seed_ptr[0]) : 0ull;
}

// acc[i][j] += sum_k Sa[k][ty + TY*i] * Sb[k][tx + TX*j]   (Sa, Sb: k-major float tiles in shared memory)
template <int RED, int LDA, int LDB, int TM, int TN, int TY, int TX>
__device__ __forceinline__ void tile_fma(const float* Sa, const float* Sb, float (&acc)[TM][TN], int ty, int tx) {
#pragma unroll 8
  for (int k = 0; k < RED; ++k) {
    float a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = Sa[k * LDA + ty + TY * i];
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = Sb[k * LDB + tx + TX * j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// Stage rows [m0, m0 + ROWS) x cols [k0, k0 + COLS) of x, dropout applied, as float32 into shared memory:
// element (mm, kk) goes to S[mm * ROW_STEP + kk * COL_STEP]. Out-of-range elements are 0.
// VEC > 1 requires K % VEC == 0, ld % VEC == 0 and a (sizeof(T) * VEC)-aligned x.
template <typename T, int ROWS, int COLS, int VEC, int ROW_STEP, int COL_STEP>
__device__ __forceinline__ void stage_dropped_x(float* S, const T* __restrict__ x, int64_t ld, int64_t M, int64_t K,
                                                int64_t m0, int64_t k0, bool has_dropout, uint64_t seed, int32_t threshold) {
  constexpr int kChunksPerRow = COLS / VEC;
  static_assert(COLS % VEC == 0, "tile width must be a multiple of the vector width");
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += kThreads) {
    const int mm = c / kChunksPerRow;
    const int kk = (c % kChunksPerRow) * VEC;
    const int64_t m = m0 + mm;
    const int64_t k = k0 + kk;
    float v[VEC];
    if (m < M && k < K) {  // with VEC > 1, K % VEC == 0: the whole vector is in range
      if constexpr (VEC > 1) {
        load_as_float<T, VEC>(x + m * ld + k, v);
      } else {
        v[0] = to_float(x[m * ld + k]);
      }
      if (has_dropout) {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (!dropout_keep(seed, m, k + e, K, threshold)) v[e] = 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) S[mm * ROW_STEP + (kk + e) * COL_STEP] = v[e];
  }
}

// Stage rows [r0, r0 + ROWS) x cols [c0, c0 + COLS) of a row-major (R, C) matrix with leading dimension ld
// (unit column stride) as float32: element (rr, cc) goes to S[rr * ROW_STEP + cc * COL_STEP].
template <typename T, int ROWS, int COLS, int ROW_STEP, int COL_STEP>
__device__ __forceinline__ void stage_matrix(float* S, const T* __restrict__ a, int64_t ld, int64_t R, int64_t C,
                                             int64_t r0, int64_t c0) {
  for (int c = threadIdx.x; c < ROWS * COLS; c += kThreads) {
    const int rr = c / COLS;
    const int cc = c % COLS;
    const int64_t row = r0 + rr;
    const int64_t col = c0 + cc;
    S[rr * ROW_STEP + cc * COL_STEP] = (row < R && col < C) ? to_float(a[row * ld + col]) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// dropout_shrink: xa (M, R) = keep_scale · (x ⊙ keep) · Aᵀ. Block: BM rows of x, BR columns of xa.
// ---------------------------------------------------------------------------------------------
constexpr int kShrinkBK = 32;

template <typename T, typename TA, int BM, int BR, int VEC>
__global__ void __launch_bounds__(kThreads)
dropout_shrink_kernel(const T* __restrict__ x, int64_t ldx, const TA* __restrict__ A, int64_t lda,
                      float* __restrict__ xa, int64_t M, int64_t K, int64_t R, const int64_t* __restrict__ seed_ptr,
                      int32_t threshold, float keep_scale, bool has_dropout) {
  constexpr int BK = kShrinkBK;
  constexpr int TN = 4;
  constexpr int TX = BR / TN;
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  static_assert(TX * TY == kThreads && TM * TY == BM, "bad shrink tile");
  constexpr int LDX = BM + 1;  // Sx[k][m], padded against bank conflicts on the transposing store
  constexpr int LDA_S = BR + 1;
  __shared__ float Sx[BK * LDX];
  __shared__ float Sa[BK * LDA_S];

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int tx = threadIdx.x % TX;
  const int ty = threadIdx.x / TX;
  const uint64_t seed = load_seed(seed_ptr, has_dropout);

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    stage_dropped_x<T, BM, BK, VEC, 1, LDX>(Sx, x, ldx, M, K, m0, k0, has_dropout, seed, threshold);
    stage_matrix<TA, BR, BK, 1, LDA_S>(Sa, A, lda, R, K, j0, k0);  // Sa[k][j] = A[j0 + j, k0 + k]
    __syncthreads();
    tile_fma<BK, LDX, LDA_S, TM, TN, TY, TX>(Sx, Sa, acc, ty, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + TY * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = j0 + tx + TX * j;
      if (col < R) xa[m * R + col] = acc[i][j] * keep_scale;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dropout_grad_a: partial[z] (R, K) = out_scale · Σ_{m in split z} dyb[m, :]ᵀ ⊗ (x ⊙ keep)[m, :].
// Block: BR rows of grad_A x 64 columns, one split of the M reduction (summed by the host).
// ---------------------------------------------------------------------------------------------
constexpr int kGradABK = 64;
constexpr int kGradABM = 32;

template <typename T, int BR, int VEC>
__global__ void __launch_bounds__(kThreads)
dropout_grad_a_kernel(const float* __restrict__ dyb, int64_t lddyb, const T* __restrict__ x, int64_t ldx,
                      float* __restrict__ partial, int64_t M, int64_t K, int64_t R, int64_t rows_per_split,
                      const int64_t* __restrict__ seed_ptr, int32_t threshold, float out_scale, bool has_dropout) {
  constexpr int BK = kGradABK;
  constexpr int BMR = kGradABM;  // reduction step over rows of x
  constexpr int TN = 4;
  constexpr int TX = BK / TN;
  constexpr int TY = kThreads / TX;
  constexpr int TM = BR / TY;
  static_assert(TX * TY == kThreads && TM * TY == BR, "bad grad_a tile");
  __shared__ float Sd[BMR * BR];  // Sd[m][j] = dyb[m, j0 + j]
  __shared__ float Sx[BMR * BK];  // Sx[m][k] = dropped x[m, k0 + k]

  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t m_end = M < m_begin + rows_per_split ? M : m_begin + rows_per_split;
  const int tx = threadIdx.x % TX;
  const int ty = threadIdx.x / TX;
  const uint64_t seed = load_seed(seed_ptr, has_dropout);

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int64_t m0 = m_begin; m0 < m_end; m0 += BMR) {
    // rows >= m_end belong to the next split (or are past M): M' = m_end masks them out.
    stage_matrix<float, BMR, BR, BR, 1>(Sd, dyb, lddyb, m_end, R, m0, j0);
    stage_dropped_x<T, BMR, BK, VEC, BK, 1>(Sx, x, ldx, m_end, K, m0, k0, has_dropout, seed, threshold);
    __syncthreads();
    tile_fma<BMR, BR, BK, TM, TN, TY, TX>(Sd, Sx, acc, ty, tx);
    __syncthreads();
  }
  float* out = partial + static_cast<int64_t>(blockIdx.z) * R * K;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t j = j0 + ty + TY * i;
    if (j >= R) continue;
#pragma unroll
    for (int jj = 0; jj < TN; ++jj) {
      const int64_t k = k0 + tx + TX * jj;
      if (k < K) out[j * K + k] = acc[i][jj] * out_scale;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// lora_dx_epilogue: grad_x[m, k] += out_scale · keep(m, k) · Σ_j dyb[m, j] A[j, k]. Block: 64 x 64 of grad_x.
// ---------------------------------------------------------------------------------------------
constexpr int kDxBM = 64;
constexpr int kDxBK = 64;
constexpr int kDxBR = 16;

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_dx_epilogue_kernel(T* __restrict__ grad_x, int64_t ldg, const float* __restrict__ dyb, int64_t lddyb,
                        const TA* __restrict__ A, int64_t lda, int64_t M, int64_t K, int64_t R,
                        const int64_t* __restrict__ seed_ptr, int32_t threshold, float out_scale, bool has_dropout) {
  constexpr int BM = kDxBM, BK = kDxBK, BR = kDxBR;
  constexpr int TN = 4;
  constexpr int TX = BK / TN;
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  static_assert(TX * TY == kThreads && TM * TY == BM, "bad dx tile");
  constexpr int LDD = BM + 1;   // Sd[j][m], padded: the store transposes
  __shared__ float Sd[BR * LDD];
  __shared__ float Sa[BR * BK];  // Sa[j][k] = A[j, k0 + k]

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;
  const int tx = threadIdx.x % TX;
  const int ty = threadIdx.x / TX;
  const uint64_t seed = load_seed(seed_ptr, has_dropout);

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int64_t r0 = 0; r0 < R; r0 += BR) {
    stage_matrix<float, BM, BR, 1, LDD>(Sd, dyb + r0, lddyb, M, R - r0, m0, 0);
    stage_matrix<TA, BR, BK, BK, 1>(Sa, A + r0 * lda, lda, R - r0, K, 0, k0);
    __syncthreads();
    tile_fma<BR, LDD, BK, TM, TN, TY, TX>(Sd, Sa, acc, ty, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + TY * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t k = k0 + tx + TX * j;
      if (k >= K) continue;
      if (has_dropout && !dropout_keep(seed, m, k, K, threshold)) continue;  // dropped: grad_x unchanged
      T* g = grad_x + m * ldg + k;
      *g = from_float<T>(to_float(*g) + acc[i][j] * out_scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dropout_mask (tests/debugging)
// ---------------------------------------------------------------------------------------------
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

#ifndef LORA_KERNELS_HOST_EMULATION  // tests/test_cuda_ext.py runs the kernels above on the host without these
// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

int shrink_block_r(int64_t R) { return R <= 16 ? 16 : (R <= 32 ? 32 : 64); }
int grad_a_block_r(int64_t R) { return R <= 16 ? 16 : (R <= 32 ? 32 : 64); }

template <typename T, typename TA, int BM, int BR>
void shrink_tile(const T* x, int64_t ldx, const TA* A, int64_t lda, float* xa, int64_t M, int64_t K, int64_t R,
                 DropoutArgs d, float keep_scale, bool vectorize, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(M, BM)), static_cast<unsigned>(ceil_div(R, BR)));
  if (vectorize) {
    dropout_shrink_kernel<T, TA, BM, BR, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(
        x, ldx, A, lda, xa, M, K, R, d.seed, d.threshold, keep_scale, d.has_dropout);
  } else {
    dropout_shrink_kernel<T, TA, BM, BR, 1><<<grid, kThreads, 0, stream>>>(
        x, ldx, A, lda, xa, M, K, R, d.seed, d.threshold, keep_scale, d.has_dropout);
  }
}

template <typename T, int BR>
void grad_a_tile(const float* dyb, int64_t lddyb, const T* x, int64_t ldx, float* partial, int64_t M, int64_t K,
                 int64_t R, int64_t splits, int64_t rows_per_split, DropoutArgs d, float out_scale, bool vectorize,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(K, kGradABK)), static_cast<unsigned>(ceil_div(R, BR)),
                  static_cast<unsigned>(splits));
  if (vectorize) {
    dropout_grad_a_kernel<T, BR, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(
        dyb, lddyb, x, ldx, partial, M, K, R, rows_per_split, d.seed, d.threshold, out_scale, d.has_dropout);
  } else {
    dropout_grad_a_kernel<T, BR, 1><<<grid, kThreads, 0, stream>>>(
        dyb, lddyb, x, ldx, partial, M, K, R, rows_per_split, d.seed, d.threshold, out_scale, d.has_dropout);
  }
}

}  // namespace

int64_t shrink_grid_y(int64_t R) { return ceil_div(R, shrink_block_r(R)); }
int64_t dx_grid_y(int64_t K) { return ceil_div(K, kDxBK); }
int64_t grad_a_row_step() { return kGradABM; }
int64_t grad_a_tiles(int64_t K, int64_t R) { return ceil_div(K, kGradABK) * ceil_div(R, grad_a_block_r(R)); }

cudaError_t launch_dropout_shrink(DType x_dtype, DType a_dtype, const void* x, int64_t ldx, const void* A,
                                  int64_t lda, float* xa, int64_t M, int64_t K, int64_t R, DropoutArgs d,
                                  float keep_scale, bool vectorize, cudaStream_t stream) {
  if (M <= 0 || K <= 0 || R <= 0) return cudaSuccess;
  return with_types(x_dtype, a_dtype, [&](auto t, auto ta) {
    using T = decltype(t);
    using TA = decltype(ta);
    const T* xp = static_cast<const T*>(x);
    const TA* ap = static_cast<const TA*>(A);
    // Narrow r tiles for small ranks (the common r = 8/16), so few FMAs are spent on padding.
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

cudaError_t launch_dropout_mask(bool* out, int64_t M, int64_t K, int64_t row_start, DropoutArgs d,
                                cudaStream_t stream) {
  if (M <= 0 || K <= 0) return cudaSuccess;
  const int64_t blocks = ceil_div(M * K, kThreads) < 65535 ? ceil_div(M * K, kThreads) : 65535;
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, M, K, row_start, d.seed, d.threshold);
  return cudaGetLastError();
}

}  // namespace lora_kernels
#else
}  // namespace
}  // namespace lora_kernels
#endif  // LORA_KERNELS_HOST_EMULATION
