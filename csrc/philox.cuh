// Triton 3.x's Philox, bit for bit, as a __host__ __device__ function.
//
// The dropout mask of lora_kernels is `keep = tl.rand(seed, offsets) >= p` with int64 offsets
// row * K + col over the logical (M, K) view of x (lora_kernels/ops/dropout.py). For an int64
// offset block, triton/language/random.py does:
//   randint4x: c0 = low 32 bits of offset, c1 = high 32 bits, c2 = c3 = 0
//   philox:    key (k0, k1) = (low, high) 32 bits of the seed (as uint64)
//   philox_impl, N_ROUNDS_DEFAULT = 10 rounds:
//       c0' = umulhi(B, c2) ^ c1 ^ k0;  c2' = umulhi(A, c0) ^ c3 ^ k1
//       c1' = B * c2;                   c3' = A * c0
//       k0 += 0x9E3779B9;               k1 += 0xBB67AE85
//   rand = uint_to_uniform_float(c0): bitcast to int32, x = x < 0 ? ~x : x, then
//       float32(x) * float32(4.6566127342e-10)
// The same function runs in the CUDA kernels and, compiled with g++, in the CPU test that checks
// it against Triton's interpreter (tests/test_cuda_ext.py), so keep it free of CUDA-only code
// outside the LK_* helpers below.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lora_kernels {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Triton passes the Python float 4.6566127342e-10 as a float32 constant: round the double.
constexpr float kUniformScale = static_cast<float>(4.6566127342e-10);

LK_HD uint32_t lk_umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// The first of Philox-4x32-10's four outputs for counter (c0, c1, 0, 0) and a 64-bit key:
// Triton's randint(seed, offset) for a 64-bit offset = (c1 << 32) | c0.
LK_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = lk_umulhi(kPhiloxRoundB, _c2) ^ c1 ^ k0;
    c2 = lk_umulhi(kPhiloxRoundA, _c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * _c2;
    c3 = kPhiloxRoundA * _c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Triton's uint_to_uniform_float for a 32-bit input: a float in [0, 1).
LK_HD float uint_to_uniform_float(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;  // == -x - 1, never overflows
#if defined(__CUDA_ARCH__)
  // Explicit round-to-nearest conversion and multiply: immune to --use_fast_math contraction.
  return __fmul_rn(__int2float_rn(x), kUniformScale);
#else
  return static_cast<float>(x) * kUniformScale;
#endif
}

// tl.rand(seed, offset) for an int64 offset.
LK_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  return uint_to_uniform_float(philox_randint(seed, offset));
}

// The dropout keep decision of element (row, col) of a logical (M, K) tensor: identical to
// lora_kernels.ops.dropout.dropout_keep. p is the float32 Triton sees for the Python float.
LK_HD bool dropout_keep(uint64_t seed, int64_t row, int64_t col, int64_t K, float p) {
  const uint64_t offset = static_cast<uint64_t>(row * K + col);
  return philox_uniform(seed, offset) >= p;
}

}  // namespace lora_kernels
