// lora_kernels._cuda: the torch-facing half of the optional CUDA backend.
//
// Argument checks (TORCH_CHECK, clear messages), output allocation, the current CUDA stream and device,
// and the Python binding. The kernels are behind the raw-pointer launchers of launchers.h, each in the .cu
// file named for it; lora_kernels/cuda_backend.py builds the autograd Function on top of these functions.
//
// Functions (x, grad_x: (M, K) float16/bfloat16/float32 with unit column stride and any row stride;
// A: (r, K) float32 or x's dtype; dyb: (M, r) float32; seed: 1-element int64 CUDA tensor, read on device;
// p in [0, 1), p == 0 meaning no dropout):
//   dropout_shrink(x, A, seed, p) -> xa (M, r) float32              = dropout_p(x) · Aᵀ
//   dropout_grad_a(dyb, x, seed, p, scaling) -> grad_A (r, K) fp32  = scaling · dybᵀ · dropout_p(x)
//   lora_dx_epilogue(grad_x, dyb, A, seed, p, scaling) -> grad_x    grad_x += scaling · (dyb · A) ⊙ keep / (1-p)
//   dropout_mask(seed, M, K, p, row_start=0) -> bool (M, K)         the keep-mask, for tests
// dropout_p(x) = x ⊙ keep / (1-p) with keep the Triton backend's mask, bit for bit (philox.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>

#include "launchers.h"
#include "philox.cuh"

namespace lora_kernels {
namespace {

bool kernel_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kFloat:
      *out = DType::kFloat32;
      return true;
    case at::kHalf:
      *out = DType::kFloat16;
      return true;
    case at::kBFloat16:
      *out = DType::kBFloat16;
      return true;
    default:
      return false;
  }
}

DType activation_dtype(const at::Tensor& t, const char* fn, const char* name) {
  DType d;
  TORCH_CHECK(kernel_dtype(t.scalar_type(), &d), "lora_kernels._cuda.", fn, ": ", name,
              " must be float16, bfloat16 or float32, got ", t.scalar_type());
  return d;
}

void check_cuda(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lora_kernels._cuda.", fn, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const at::Tensor& t, const char* fn, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_cuda(t, fn, name);
  TORCH_CHECK(t.device() == ref.device(), "lora_kernels._cuda.", fn, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// The (M, K) activation operand (x, grad_x): a CUDA tensor the kernels address as rows (2-D, unit column
// stride, non-negative row stride) in a dtype they take, returned.
DType check_activation(const at::Tensor& t, const char* fn, const char* name) {
  check_cuda(t, fn, name);
  TORCH_CHECK(t.dim() == 2, "lora_kernels._cuda.", fn, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "lora_kernels._cuda.", fn, ": ", name,
              " must have unit stride along its last dimension (any row stride is fine), got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= 0, "lora_kernels._cuda.", fn, ": ", name,
              " has a negative row stride ", t.stride(0));
  return activation_dtype(t, fn, name);
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0); }

bool has_rows_layout(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= 0);
}

DropoutArgs dropout_args(const at::Tensor& seed, double p, const char* fn, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_kernels._cuda.", fn, ": dropout p must be in [0, 1), got ", p);
  check_same_device(seed, fn, "seed", ref, ref_name);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() >= 1, "lora_kernels._cuda.", fn,
              ": seed must be an int64 tensor with at least one element, got ", seed.scalar_type(), " with ",
              seed.numel(), " elements");
  // The kernels read element 0 through a raw pointer.
  return DropoutArgs{seed.data_ptr<int64_t>(), drop_threshold(p), p > 0.0};
}

// A (r, K) in float32 or x's dtype. A is small: a layout the kernels cannot address is copied.
at::Tensor prepare_lora_a(const at::Tensor& A, const char* fn, const at::Tensor& x, const char* x_name, int64_t K) {
  check_same_device(A, fn, "A", x, x_name);
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K, "lora_kernels._cuda.", fn, ": A must have shape (r, ", K, "), got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == x.scalar_type(), "lora_kernels._cuda.", fn,
              ": A must be float32 or ", x_name, "'s dtype (", x.scalar_type(), "), got ", A.scalar_type());
  return has_rows_layout(A) ? A : A.contiguous();
}

// dyb (M, r) float32 (small: r columns), copied if the kernels cannot address it.
at::Tensor prepare_dyb(const at::Tensor& dyb, const char* fn, const at::Tensor& x, const char* x_name, int64_t M) {
  check_same_device(dyb, fn, "dyb", x, x_name);
  TORCH_CHECK(dyb.dim() == 2 && dyb.size(0) == M, "lora_kernels._cuda.", fn, ": dyb must have shape (", M,
              ", r), got ", dyb.sizes());
  TORCH_CHECK(dyb.scalar_type() == at::kFloat, "lora_kernels._cuda.", fn, ": dyb must be float32, got ",
              dyb.scalar_type());
  return has_rows_layout(dyb) ? dyb : dyb.contiguous();
}

// scaling / (1 - p) with dropout, else scaling, rounded once to float32: the factor the kernels apply to their
// float32 sums.
float dropout_scale(double scaling, double p, const DropoutArgs& d) {
  return static_cast<float>(d.has_dropout ? scaling / (1.0 - p) : scaling);
}

// 16-byte vector loads of x when its address, row stride and width allow them.
bool can_vectorize(const at::Tensor& x, int64_t ld, int64_t K) {
  const int64_t vec = 16 / static_cast<int64_t>(x.element_size());
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && ld % vec == 0 && K % vec == 0;
}

int64_t sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

}  // namespace

at::Tensor dropout_shrink(const at::Tensor& x, const at::Tensor& A_in, const at::Tensor& seed, double p) {
  constexpr const char* fn = "dropout_shrink";
  const DType xt = check_activation(x, fn, "x");
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor A = prepare_lora_a(A_in, fn, x, "x", K);
  const int64_t R = A.size(0);
  TORCH_CHECK(shrink_grid_y(R) <= kMaxGridYZ, "lora_kernels._cuda.dropout_shrink: rank r=", R, " is too large");
  const c10::cuda::CUDAGuard guard(x.device());
  const DropoutArgs d = dropout_args(seed, p, fn, x, "x");
  at::Tensor xa = at::empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0 || R == 0) return xa;
  if (K == 0) return xa.zero_();
  const DType at_ = activation_dtype(A, fn, "A");
  const float keep_scale = dropout_scale(1.0, p, d);
  const int64_t ldx = row_stride(x);
  C10_CUDA_CHECK(launch_dropout_shrink(xt, at_, x.data_ptr(), ldx, A.data_ptr(), row_stride(A), xa.data_ptr<float>(),
                                       M, K, R, d, keep_scale, can_vectorize(x, ldx, K),
                                       c10::cuda::getCurrentCUDAStream()));
  return xa;
}

at::Tensor dropout_grad_a(const at::Tensor& dyb_in, const at::Tensor& x, const at::Tensor& seed, double p,
                          double scaling) {
  constexpr const char* fn = "dropout_grad_a";
  const DType xt = check_activation(x, fn, "x");
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor dyb = prepare_dyb(dyb_in, fn, x, "x", M);
  const int64_t R = dyb.size(1);
  TORCH_CHECK(ceil_div(R, 16) <= kMaxGridYZ, "lora_kernels._cuda.dropout_grad_a: rank r=", R, " is too large");
  const c10::cuda::CUDAGuard guard(x.device());
  const DropoutArgs d = dropout_args(seed, p, fn, x, "x");
  if (M == 0 || K == 0 || R == 0) return at::zeros({R, K}, x.options().dtype(at::kFloat));
  const float out_scale = dropout_scale(scaling, p, d);
  const int64_t ldx = row_stride(x);

  // Split the M reduction so that about two waves of blocks run, each split at least 8 row steps long;
  // the partial sums are added by one torch sum (deterministic, unlike atomics).
  const int64_t step = grad_a_row_step();
  const int64_t tiles = grad_a_tiles(K, R);
  const int64_t max_splits = std::max<int64_t>(1, ceil_div(M, 8 * step));
  const int64_t want = std::max<int64_t>(1, ceil_div(2 * sm_count(), tiles));
  const int64_t splits = std::min<int64_t>({max_splits, want, kMaxGridYZ});
  const int64_t rows_per_split = ceil_div(ceil_div(M, splits), step) * step;
  const int64_t used_splits = ceil_div(M, rows_per_split);
  at::Tensor partial = at::empty({used_splits, R, K}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_dropout_grad_a(xt, dyb.data_ptr<float>(), row_stride(dyb), x.data_ptr(), ldx,
                                       partial.data_ptr<float>(), M, K, R, used_splits, rows_per_split, d, out_scale,
                                       can_vectorize(x, ldx, K), c10::cuda::getCurrentCUDAStream()));
  return used_splits == 1 ? partial.view({R, K}) : partial.sum(0);
}

at::Tensor lora_dx_epilogue(at::Tensor grad_x, const at::Tensor& dyb_in, const at::Tensor& A_in,
                            const at::Tensor& seed, double p, double scaling) {
  constexpr const char* fn = "lora_dx_epilogue";
  const DType gt = check_activation(grad_x, fn, "grad_x");
  const int64_t M = grad_x.size(0), K = grad_x.size(1);
  TORCH_CHECK(M <= 1 || K <= 1 || grad_x.stride(0) >= K, "lora_kernels._cuda.lora_dx_epilogue: grad_x is written ",
              "in place but its rows overlap (row stride ", grad_x.stride(0), " < K=", K, ")");
  const at::Tensor dyb = prepare_dyb(dyb_in, fn, grad_x, "grad_x", M);
  const at::Tensor A = prepare_lora_a(A_in, fn, grad_x, "grad_x", K);
  const int64_t R = A.size(0);
  TORCH_CHECK(dyb.size(1) == R, "lora_kernels._cuda.lora_dx_epilogue: dyb has ", dyb.size(1),
              " columns but A has r=", R, " rows");
  TORCH_CHECK(dx_grid_y(K) <= kMaxGridYZ, "lora_kernels._cuda.lora_dx_epilogue: K=", K, " is too large");
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const DropoutArgs d = dropout_args(seed, p, fn, grad_x, "grad_x");
  if (M == 0 || K == 0 || R == 0) return grad_x;
  const DType at_ = activation_dtype(A, fn, "A");
  const float out_scale = dropout_scale(scaling, p, d);
  C10_CUDA_CHECK(launch_lora_dx_epilogue(gt, at_, grad_x.data_ptr(), row_stride(grad_x), dyb.data_ptr<float>(),
                                         row_stride(dyb), A.data_ptr(), row_stride(A), M, K, R, d, out_scale,
                                         c10::cuda::getCurrentCUDAStream()));
  return grad_x;
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t M, int64_t K, double p, int64_t row_start) {
  constexpr const char* fn = "dropout_mask";
  check_cuda(seed, fn, "seed");
  TORCH_CHECK(M >= 0 && K >= 0 && row_start >= 0, "lora_kernels._cuda.dropout_mask: M, K and row_start must be ",
              ">= 0, got M=", M, ", K=", K, ", row_start=", row_start);
  const c10::cuda::CUDAGuard guard(seed.device());
  DropoutArgs d = dropout_args(seed, p, fn, seed, "seed");
  at::Tensor out = at::empty({M, K}, seed.options().dtype(at::kBool));
  C10_CUDA_CHECK(launch_dropout_mask(out.data_ptr<bool>(), M, K, row_start, d, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "lora_kernels CUDA backend: dropout-fused LoRA kernels (mask bit-identical to the Triton backend)";
  m.def("dropout_shrink", &lora_kernels::dropout_shrink, py::arg("x"), py::arg("A"), py::arg("seed"), py::arg("p"),
        "xa (M, r) float32 = dropout_p(x) @ A.T for x (M, K) fp16/bf16/fp32 (unit column stride), A (r, K) "
        "float32 or x's dtype, seed a 1-element int64 CUDA tensor");
  m.def("dropout_grad_a", &lora_kernels::dropout_grad_a, py::arg("dyb"), py::arg("x"), py::arg("seed"), py::arg("p"),
        py::arg("scaling"), "grad_A (r, K) float32 = scaling * dyb.T @ dropout_p(x) for dyb (M, r) float32");
  m.def("lora_dx_epilogue", &lora_kernels::lora_dx_epilogue, py::arg("grad_x"), py::arg("dyb"), py::arg("A"),
        py::arg("seed"), py::arg("p"), py::arg("scaling"),
        "grad_x (M, K) += scaling * (dyb @ A) * keep / (1 - p), in place; returns grad_x");
  m.def("dropout_mask", &lora_kernels::dropout_mask, py::arg("seed"), py::arg("M"), py::arg("K"), py::arg("p"),
        py::arg("row_start") = 0,
        "bool keep-mask (M, K) of rows [row_start, row_start + M) of a (*, K) tensor; for tests");
}
