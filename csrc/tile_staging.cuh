// Device helpers shared by the GEMM-shaped dropout kernels (dropout_shrink.cu, dropout_grad_a.cu,
// lora_dx_epilogue.cu).
//
// All three use one scheme: a kThreads-thread block owns an output tile, stages float32 operand tiles
// (dropout already applied, inputs converted) in shared memory and accumulates a TM x TN register micro-tile
// per thread with FMAs in float32. The shapes involved have one small dimension (r <= a few hundred), so
// this SIMT scheme is expected to be bound by memory bandwidth and Philox, not by FMAs, at the ranks LoRA
// uses (not yet measured on a GPU).
//
// Plain device code: no torch header, and nothing that the host emulation (tests/cuda_host_emulation/)
// cannot compile with the host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.cuh"

namespace lora_kernels {

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

// Threads per block of every tiled kernel (the staging loops and MicroTile are written for it).
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

// The Philox seed, read on device; not read (and 0) without dropout.
__device__ __forceinline__ uint64_t load_seed(const int64_t* seed_ptr, bool has_dropout) {
  return has_dropout ? static_cast<uint64_t>(seed_ptr[0]) : 0ull;
}

// The register micro-tiling of a BM x BN output tile: the block's kThreads threads form a TY x TX grid, and
// thread (ty, tx) = (threadIdx.x / TX, threadIdx.x % TX) accumulates, in float32 registers acc[TM][TN], the
// elements at tile rows ty + TY·i and tile columns tx + TX·j (strided, so that neighbouring threads read
// neighbouring shared-memory words and store neighbouring columns). Only the geometry lives here: each
// kernel keeps tx, ty and acc as locals (held in a struct instead, nvcc allocated registers differently).
template <int BM, int BN>
struct MicroTile {
  static constexpr int TN = 4;
  static constexpr int TX = BN / TN;
  static constexpr int TY = kThreads / TX;
  static constexpr int TM = BM / TY;
  static_assert(TX * TY == kThreads && TM * TY == BM, "the block's threads must cover the BM x BN tile exactly");
};

template <int TM, int TN>
__device__ __forceinline__ void zero_tile(float (&acc)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
}

// acc[i][j] += sum_{k < RED} Sa[k][ty + TY*i] * Sb[k][tx + TX*j]   (Sa, Sb: k-major float tiles in shared memory
// with rows of LDA and LDB floats)
template <int RED, int LDA, int LDB, typename Tile>
__device__ __forceinline__ void tile_fma(const float* Sa, const float* Sb, float (&acc)[Tile::TM][Tile::TN], int ty,
                                         int tx) {
#pragma unroll 8
  for (int k = 0; k < RED; ++k) {
    float a[Tile::TM], b[Tile::TN];
#pragma unroll
    for (int i = 0; i < Tile::TM; ++i) a[i] = Sa[k * LDA + ty + Tile::TY * i];
#pragma unroll
    for (int j = 0; j < Tile::TN; ++j) b[j] = Sb[k * LDB + tx + Tile::TX * j];
#pragma unroll
    for (int i = 0; i < Tile::TM; ++i)
#pragma unroll
      for (int j = 0; j < Tile::TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// Calls store(row, col, acc[i][j]) for each of thread (ty, tx)'s elements inside [0, rows) x [0, cols), the
// tile's element (0, 0) being (row0, col0).
template <typename Tile, typename Store>
__device__ __forceinline__ void store_tile(const float (&acc)[Tile::TM][Tile::TN], int ty, int tx, int64_t row0,
                                           int64_t col0, int64_t rows, int64_t cols, Store&& store) {
#pragma unroll
  for (int i = 0; i < Tile::TM; ++i) {
    const int64_t row = row0 + ty + Tile::TY * i;
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < Tile::TN; ++j) {
      const int64_t col = col0 + tx + Tile::TX * j;
      if (col < cols) store(row, col, acc[i][j]);
    }
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

}  // namespace lora_kernels
