// Triton 3.x's Philox, bit for bit, as a __host__ __device__ function.
//
// The dropout mask of lora_kernels (lora_kernels/ops/dropout.py) for element (row, col) of the logical
// (M, K) view of x uses one of the four words of a Philox-4x32-10 call:
//   counter = row * ceil(K / 4) + col / 4 (int64), bits = tl.randint4x(seed, counter)[col % 4],
//   keep    = (bits >> 8) >= drop_threshold(p) = floor(p * 2^24).
// For an int64 counter, triton/language/random.py does:
//   randint4x: c0 = low 32 bits of counter, c1 = high 32 bits, c2 = c3 = 0
//   philox:    key (k0, k1) = (low, high) 32 bits of the seed (as uint64)
//   philox_impl, N_ROUNDS_DEFAULT = 10 rounds:
//       c0' = umulhi(B, c2) ^ c1 ^ k0;  c2' = umulhi(A, c0) ^ c3 ^ k1
//       c1' = B * c2;                   c3' = A * c0
//       k0 += 0x9E3779B9;               k1 += 0xBB67AE85
//   and returns (c0, c1, c2, c3).
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

LK_HD uint32_t lk_umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

struct PhiloxWords {
  uint32_t w[4];
};

// Philox-4x32-10 for counter (c0, c1, 0, 0) and a 64-bit key: Triton's randint4x(seed, counter) for a
// 64-bit counter = (c1 << 32) | c0.
LK_HD PhiloxWords philox4x32(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
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
  return PhiloxWords{{c0, c1, c2, c3}};
}

// ops/dropout.py's drop_threshold: floor(p * 2^24) for p in [0, 1) (the product is exact in double).
LK_HD int32_t drop_threshold(double p) { return static_cast<int32_t>(p * 16777216.0); }

// The random word of element (row, col) of a logical (M, K) tensor: ops/dropout.py's dropout_bits.
LK_HD uint32_t dropout_bits(uint64_t seed, int64_t row, int64_t col, int64_t K) {
  const uint64_t counter = static_cast<uint64_t>(row * ((K + 3) / 4) + col / 4);
  return philox4x32(seed, counter).w[col % 4];
}

// The dropout keep decision of element (row, col): identical to ops/dropout.py's dropout_keep.
LK_HD bool dropout_keep(uint64_t seed, int64_t row, int64_t col, int64_t K, int32_t threshold) {
  return static_cast<int32_t>(dropout_bits(seed, row, col, K) >> 8) >= threshold;
}

}  // namespace lora_kernels
