// Launchers of the dropout-fused LoRA kernels, each defined below its kernel in the .cu file named for it
// (dropout_shrink.cu, dropout_grad_a.cu, lora_dx_epilogue.cu, dropout_mask.cu), called by bindings.cpp.
//
// This header is plain C++ over raw pointers so that the .cu files need no torch headers (nvcc compiles them
// in seconds) and the torch-facing checks, allocation and dispatch live in bindings.cpp (host compiler).
// Every dropout decision is lora_kernels::dropout_keep (philox.cuh): the Triton backend's mask for element
// (row, col) of the logical (M, K) tensor, regenerated from *seed (read on device), never stored.
// has_dropout == false means no mask (the seed is not read). Matrices are row-major with the given row
// stride ("ld", in elements) and unit column stride. Each launcher returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lora_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ceil(a / b) for a >= 0, b > 0: the launchers' grid sizes and the grad_A split arithmetic of bindings.cpp.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DropoutArgs {
  const int64_t* seed;  // 1-element device buffer
  int32_t threshold;    // drop_threshold(p) (philox.cuh): an element is kept iff its top 24 random bits >= it
  bool has_dropout;
};

// xa (M, R) float32, contiguous = keep_scale · (x ⊙ keep) · Aᵀ. x (M, K) of x_dtype; A (R, K) of a_dtype.
// vectorize: 16-byte loads of x (requires a 16-byte-aligned x, ldx and K multiples of 16 / sizeof(x elem)).
cudaError_t launch_dropout_shrink(DType x_dtype, DType a_dtype, const void* x, int64_t ldx, const void* A,
                                  int64_t lda, float* xa, int64_t M, int64_t K, int64_t R, DropoutArgs d,
                                  float keep_scale, bool vectorize, cudaStream_t stream);

// partial (splits, R, K) float32, contiguous; partial[z] = out_scale · Σ_{m in split z} dyb[m]ᵀ ⊗ (x ⊙ keep)[m],
// split z covering rows [z · rows_per_split, (z + 1) · rows_per_split). rows_per_split must be a multiple of
// grad_a_row_step(). dyb (M, R) float32.
cudaError_t launch_dropout_grad_a(DType x_dtype, const float* dyb, int64_t lddyb, const void* x, int64_t ldx,
                                  float* partial, int64_t M, int64_t K, int64_t R, int64_t splits,
                                  int64_t rows_per_split, DropoutArgs d, float out_scale, bool vectorize,
                                  cudaStream_t stream);
int64_t grad_a_row_step();
// Output-tile blocks of dropout_grad_a per split, for choosing the number of splits.
int64_t grad_a_tiles(int64_t K, int64_t R);

// grad_x (M, K) of g_dtype += out_scale · keep ⊙ (dyb · A), in place. dyb (M, R) float32; A (R, K) of a_dtype.
cudaError_t launch_lora_dx_epilogue(DType g_dtype, DType a_dtype, void* grad_x, int64_t ldg, const float* dyb,
                                    int64_t lddyb, const void* A, int64_t lda, int64_t M, int64_t K, int64_t R,
                                    DropoutArgs d, float out_scale, cudaStream_t stream);

// out (M, K) bool, contiguous: the keep-mask of rows [row_start, row_start + M) of a logical (*, K) tensor.
cudaError_t launch_dropout_mask(bool* out, int64_t M, int64_t K, int64_t row_start, DropoutArgs d,
                                cudaStream_t stream);

// Grid limits the launchers need (checked by the callers, which can give a clear message).
constexpr int64_t kMaxGridYZ = 65535;
int64_t shrink_grid_y(int64_t R);
int64_t dx_grid_y(int64_t K);

}  // namespace lora_kernels
