// Host emulation of the CUDA kernels of csrc/ (dropout_shrink.cu, dropout_grad_a.cu, lora_dx_epilogue.cu,
// dropout_mask.cu), for machines without a GPU.
//
// The kernels are compiled by the host compiler (g++ -std=c++20 -pthread -I<cuda>/include -I csrc) and run
// block by block: a block's 256 threads are std::threads, __syncthreads() is a std::barrier and __shared__
// arrays are function-local statics (one block runs at a time, so they are the block's shared memory).
// Results are compared with a float64 reference that uses the same host Philox (philox.cuh, itself checked
// bit for bit against Triton by tests/test_cuda_ext.py). This checks tiling, indexing, vectorised and
// scalar loads, split reductions, strides, dtype conversions and where the mask and 1/(1-p) are applied;
// it cannot check device-only behaviour (memory model, alignment faults, launch configuration limits).
// Exit status 0 when every check passes. Run by tests/test_cuda_ext.py::test_kernels_under_host_emulation.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

struct EmuIdx { unsigned x, y, z; };
thread_local EmuIdx emu_threadIdx;
EmuIdx emu_blockIdx, emu_gridDim, emu_blockDim;
std::barrier<>* emu_barrier = nullptr;
inline void emu_syncthreads() { emu_barrier->arrive_and_wait(); }
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define gridDim emu_gridDim
#define blockDim emu_blockDim
#define __syncthreads emu_syncthreads
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define LORA_KERNELS_HOST_EMULATION  // the .cu files leave out their launchers (<<<...>>> launches)
#include "dropout_grad_a.cu"
#include "dropout_mask.cu"
#include "dropout_shrink.cu"
#include "lora_dx_epilogue.cu"

using namespace lora_kernels;

template <typename F>
void launch(unsigned gx, unsigned gy, unsigned gz, F&& body) {
  emu_gridDim = {gx, gy, gz};
  emu_blockDim = {256, 1, 1};
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        emu_blockIdx = {x, y, z};
        std::barrier<> bar(256);
        emu_barrier = &bar;
        std::vector<std::thread> ts;
        ts.reserve(256);
        for (unsigned t = 0; t < 256; ++t)
          ts.emplace_back([&, t] { emu_threadIdx = {t, 0, 0}; body(); });
        for (auto& th : ts) th.join();
      }
}

// ---------------------------------------------------------------------------------------------
// checks against a double-precision reference that uses the same host Philox (checked against Triton
// separately): what is verified here is the kernels' tiling, indexing, vectorisation, splits and scaling.
// ---------------------------------------------------------------------------------------------
static int failures = 0;

template <typename T> T host_from_float(float v);
template <> float host_from_float<float>(float v) { return v; }
template <> __half host_from_float<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 host_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
double host_to_double(float v) { return v; }
double host_to_double(__half v) { return __half2float(v); }
double host_to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
std::vector<T> random_matrix(int64_t rows, int64_t ld, std::mt19937& g, float scale) {
  std::normal_distribution<float> n(0.f, scale);
  std::vector<T> v(rows * ld + 16);  // +16: room for a misaligned base
  for (auto& e : v) e = host_from_float<T>(n(g));
  return v;
}

void report(const char* what, const char* detail, double err, double tol) {
  const bool ok = err <= tol && std::isfinite(err);
  if (!ok) ++failures;
  std::printf("%s %s %s err=%.3g tol=%.3g\n", ok ? "ok  " : "FAIL", what, detail, err, tol);
}

double keep_factor(uint64_t seed, int64_t m, int64_t k, int64_t K, float p, bool has) {
  if (!has) return 1.0;
  return dropout_keep(seed, m, k, K, drop_threshold(p)) ? 1.0 / (1.0 - (double)p) : 0.0;
}

template <typename T, typename TA, int BM, int BR, int VEC>
void check_shrink(const char* name, int64_t M, int64_t K, int64_t R, int64_t pad, float p, uint64_t seedv) {
  std::mt19937 g(M * 31 + K * 7 + R);
  const int64_t ldx = K + pad;
  auto x = random_matrix<T>(M, ldx, g, 1.f);
  auto A = random_matrix<TA>(R, K, g, 1.f / std::sqrt((float)K));
  std::vector<float> xa(M * R, -1e30f);
  const int64_t seed = (int64_t)seedv;
  const bool has = p > 0;
  const float keep_scale = has ? (float)(1.0 / (1.0 - p)) : 1.f;
  launch((unsigned)((M + BM - 1) / BM), (unsigned)((R + BR - 1) / BR), 1, [&] {
    dropout_shrink_kernel<T, TA, BM, BR, VEC>(x.data(), ldx, A.data(), K, xa.data(), M, K, R, &seed, drop_threshold(p), keep_scale, has);
  });
  double err = 0, mx = 1;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < R; ++j) {
      double ref = 0;
      for (int64_t k = 0; k < K; ++k)
        ref += host_to_double(x[m * ldx + k]) * keep_factor(seedv, m, k, K, p, has) * host_to_double(A[j * K + k]);
      err = std::max(err, std::fabs(ref - xa[m * R + j]));
      mx = std::max(mx, std::fabs(ref));
    }
  char d[160];
  std::snprintf(d, sizeof d, "M=%ld K=%ld r=%ld pad=%ld p=%.2f BM=%d BR=%d VEC=%d", (long)M, (long)K, (long)R, (long)pad, p, BM, BR, VEC);
  report(name, d, err / mx, 2e-6);
}

template <typename T, int BR, int VEC>
void check_grad_a(const char* name, int64_t M, int64_t K, int64_t R, int64_t pad, float p, int64_t rows_per_split) {
  std::mt19937 g(M * 3 + K * 5 + R);
  const int64_t ldx = K + pad, lddyb = R + 1;
  auto x = random_matrix<T>(M, ldx, g, 1.f);
  auto dyb = random_matrix<float>(M, lddyb, g, 1.f);
  const int64_t splits = (M + rows_per_split - 1) / rows_per_split;
  std::vector<float> partial(splits * R * K, -1e30f);
  const int64_t seed = 987654321;
  const bool has = p > 0;
  const float s = 1.5f, out_scale = has ? (float)(1.5 / (1.0 - p)) : 1.5f;
  launch((unsigned)((K + 63) / 64), (unsigned)((R + BR - 1) / BR), (unsigned)splits, [&] {
    dropout_grad_a_kernel<T, BR, VEC>(dyb.data(), lddyb, x.data(), ldx, partial.data(), M, K, R, rows_per_split, &seed, drop_threshold(p), out_scale, has);
  });
  double err = 0, mx = 1;
  for (int64_t j = 0; j < R; ++j)
    for (int64_t k = 0; k < K; ++k) {
      double ref = 0, got = 0;
      for (int64_t m = 0; m < M; ++m)
        ref += dyb[m * lddyb + j] * host_to_double(x[m * ldx + k]) * (has ? (dropout_keep(seed, m, k, K, drop_threshold(p)) ? 1.0 : 0.0) : 1.0);
      ref *= has ? s / (1.0 - p) : s;
      for (int64_t z = 0; z < splits; ++z) got += partial[(z * R + j) * K + k];
      err = std::max(err, std::fabs(ref - got));
      mx = std::max(mx, std::fabs(ref));
    }
  char d[160];
  std::snprintf(d, sizeof d, "M=%ld K=%ld r=%ld pad=%ld p=%.2f BR=%d VEC=%d splits=%ld", (long)M, (long)K, (long)R, (long)pad, p, BR, VEC, (long)splits);
  report(name, d, err / mx, 2e-6);
}

template <typename T, typename TA>
void check_dx(const char* name, int64_t M, int64_t K, int64_t R, float p, double tol) {
  std::mt19937 g(M + K * 11 + R * 13);
  const int64_t ldg = K + 5, lddyb = R + 2, lda = K + 1;
  auto grad = random_matrix<T>(M, ldg, g, 1.f);
  auto before = grad;
  auto dyb = random_matrix<float>(M, lddyb, g, 1.f);
  auto A = random_matrix<TA>(R, lda, g, 1.f / std::sqrt((float)R));
  const int64_t seed = 4242;
  const bool has = p > 0;
  const float out_scale = has ? (float)(0.75 / (1.0 - p)) : 0.75f;
  launch((unsigned)((M + 63) / 64), (unsigned)((K + 63) / 64), 1, [&] {
    lora_dx_epilogue_kernel<T, TA>(grad.data(), ldg, dyb.data(), lddyb, A.data(), lda, M, K, R, &seed, drop_threshold(p), out_scale, has);
  });
  double err = 0, mx = 1;
  int64_t untouched_bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      double t = 0;
      for (int64_t j = 0; j < R; ++j) t += dyb[m * lddyb + j] * host_to_double(A[j * lda + k]);
      const double ref = host_to_double(before[m * ldg + k]) + 0.75 * t * keep_factor(seed, m, k, K, p, has);
      err = std::max(err, std::fabs(ref - host_to_double(grad[m * ldg + k])));
      mx = std::max(mx, std::fabs(ref));
      if (has && !dropout_keep(seed, m, k, K, drop_threshold(p)) && host_to_double(grad[m * ldg + k]) != host_to_double(before[m * ldg + k])) ++untouched_bad;
    }
    for (int64_t k = K; k < ldg; ++k)  // padding between rows is never written
      if (host_to_double(grad[m * ldg + k]) != host_to_double(before[m * ldg + k])) ++untouched_bad;
  }
  char d[160];
  std::snprintf(d, sizeof d, "M=%ld K=%ld r=%ld p=%.2f", (long)M, (long)K, (long)R, p);
  report(name, d, err / mx + (double)untouched_bad, tol);
}

void check_mask(int64_t M, int64_t K, int64_t row_start, float p) {
  const int64_t seed = 2024;
  std::vector<unsigned char> out(M * K, 2);
  launch(3, 1, 1, [&] { dropout_mask_kernel(reinterpret_cast<bool*>(out.data()), M, K, row_start, &seed, drop_threshold(p)); });
  int64_t bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) bad += out[m * K + k] != (dropout_keep(seed, row_start + m, k, K, drop_threshold(p)) ? 1 : 0);
  char d[128];
  std::snprintf(d, sizeof d, "M=%ld K=%ld row_start=%ld", (long)M, (long)K, (long)row_start);
  report("dropout_mask", d, (double)bad, 0);
}

int main() {
  // dropout_shrink: every tile config, vectorised (pad 0, K % 8 == 0) and scalar (pad 3) loads,
  // ranks below, at and above one r tile, dropout on and off.
  check_shrink<float, float, 128, 16, 4>("shrink f32", 130, 72, 3, 0, 0.3f, 11);
  check_shrink<float, float, 128, 16, 1>("shrink f32", 130, 71, 16, 3, 0.3f, 11);
  check_shrink<__half, float, 128, 32, 8>("shrink f16/A f32", 70, 80, 20, 0, 0.5f, 12);
  check_shrink<__half, __half, 128, 32, 1>("shrink f16/A f16", 70, 77, 32, 3, 0.0f, 12);
  check_shrink<__nv_bfloat16, __nv_bfloat16, 64, 64, 8>("shrink bf16", 65, 64, 70, 0, 0.2f, 13);
  check_shrink<__nv_bfloat16, float, 64, 64, 1>("shrink bf16/A f32", 65, 33, 40, 3, 0.2f, 13);
  // dropout_grad_a: splits of the M reduction, partial last split, r tiles.
  check_grad_a<float, 16, 4>("grad_a f32", 200, 72, 3, 0, 0.3f, 64);
  check_grad_a<float, 16, 1>("grad_a f32", 45, 70, 16, 3, 0.0f, 64);
  check_grad_a<__half, 32, 8>("grad_a f16", 130, 64, 20, 0, 0.5f, 32);
  check_grad_a<__nv_bfloat16, 64, 1>("grad_a bf16", 100, 65, 70, 3, 0.2f, 96);
  // lora_dx_epilogue: strided grad_x / dyb / A, r below and across the 16-wide r step.
  check_dx<float, float>("dx f32", 70, 72, 3, 0.3f, 2e-6);
  check_dx<float, float>("dx f32", 65, 130, 20, 0.0f, 2e-6);
  check_dx<__half, float>("dx f16/A f32", 70, 66, 17, 0.5f, 1e-3);
  check_dx<__half, __half>("dx f16/A f16", 64, 64, 8, 0.2f, 1e-3);
  check_dx<__nv_bfloat16, __nv_bfloat16>("dx bf16", 33, 100, 33, 0.1f, 8e-3);
  check_mask(37, 53, 0, 0.3f);
  check_mask(5, 1000, (int64_t(1) << 32) / 1000 - 2, 0.5f);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
