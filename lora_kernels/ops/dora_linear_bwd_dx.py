"""DoRA backward with dropout: grad_x = dy·W + ((g − 1)·dy·W + s·dyB·A) ⊙ mask/(1 − p), dyB = (g·dy)·B.

Each step over N loads a dy tile and a W tile once and feeds two MMAs: dy·W and ((g − 1)·dy)·W (dy scaled per
column in registers). The LoRA term s·dyB·A joins the second accumulator, which is masked with the Philox
keep-mask of ops/dropout.py (regenerated from the forward's seed) and scaled by 1/(1 − p) before the single store.
Without dropout DoRA's grad_x is plain LoRA's with g·dy (ops/lora_linear_bwd_dx.py), so this kernel is p > 0 only.
A 4-bit W (QuantizedWeight) is dequantized tile by tile in registers (W_4BIT, as in lora_linear_bwd_dx.py).
"""
import torch
import triton
import triton.language as tl

from .configs import gemm_configs, lora_block_r
from .dequant_4bit import dequant_4bit_rows, dequant_4bit_tile, kernel_args, launch_options, weight_operand
from .dropout import drop_threshold, dropout_keep
from .layout import grouped_tile


@triton.autotune(configs=gemm_configs(out_block="BLOCK_K", reduce_block="BLOCK_N"),
                 key=["M_BUCKET", "N", "K", "R", "W_4BIT"])
@triton.jit
def _dora_bwd_dx_kernel(
    dy_ptr, w_ptr, g_ptr, dyb_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dybm, stride_dybr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    scaling, threshold, keep_scale,
    q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    W_4BIT: tl.constexpr, Q_BLOCK: tl.constexpr, Q_BLOCK2: tl.constexpr, Q_DOUBLE: tl.constexpr,
    Q_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    row_ok = rm < M
    k_ok = rk < K
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn_ = n0 + rn
        n_ok = nn_ < N
        dy = tl.load(dy_rows + nn_[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if W_4BIT and Q_ALIGNED:  # bnb's packed W: element n·K + k of its flattening
            w = dequant_4bit_rows(w_ptr, nn_[:, None] * K, pid_k * BLOCK_K, K, n_ok[:, None], q_absmax_ptr, q_code_ptr,
                                  q_absmax2_ptr, q_code2_ptr, q_offset_ptr, Q_BLOCK, Q_BLOCK2, Q_DOUBLE,
                                  BLOCK_K).to(dy.dtype)
        elif W_4BIT:
            w = dequant_4bit_tile(w_ptr, nn_[:, None] * K, rk[None, :], pid_k * BLOCK_K, n_ok[:, None] & k_ok[None, :],
                                  n_ok[:, None], q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
                                  Q_BLOCK, Q_BLOCK2, Q_DOUBLE, Q_ALIGNED, BLOCK_K).to(dy.dtype)
        else:
            w = tl.load(w_ptr + nn_[:, None] * stride_wn + rk[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        g1 = tl.load(g_ptr + nn_, mask=n_ok, other=1.0) - 1.0
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        acc_d = tl.dot((dy.to(tl.float32) * g1[None, :]).to(dy.dtype), w, acc_d, input_precision=DOT_PRECISION)

    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):  # s·dyB·A in the activation dtype, as the LoRA backward computes it
        r_idx = r0 + rr
        r_ok = r_idx < R
        dyb = tl.load(dyb_ptr + rm[:, None] * stride_dybm + r_idx[None, :] * stride_dybr,
                      mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + r_idx[:, None] * stride_ar + rk[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc_d = tl.dot((dyb * scaling).to(dx_ptr.dtype.element_ty), a.to(dx_ptr.dtype.element_ty), acc_d,
                       input_precision=DOT_PRECISION)
    keep = dropout_keep(tl.load(seed_ptr), rm, pid_k * BLOCK_K, K, threshold, BLOCK_K)
    dx = acc + tl.where(keep, acc_d * keep_scale, 0.0)
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


def dora_linear_bwd_dx(dy: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, dyb: torch.Tensor,
                       lora_A: torch.Tensor, seed: torch.Tensor, scaling: float, p: float,
                       dot_precision: str) -> torch.Tensor:
    """grad_x (M, K) in dy's dtype for dy (M, N), weight (N, K) in dy's dtype (any strides) or a 4-bit
    QuantizedWeight, g (N,) float32,
    dyB = (g·dy)·B (M, r) float32, lora_A (r, K) any float dtype, and the forward's seed and p > 0."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dora_linear_bwd_dx is the dropout path: p must be in (0, 1), got {p!r}")
    M, N = dy.shape
    K, R = weight.shape[1], lora_A.shape[0]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    quant, w, w_strides = weight_operand(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _dora_bwd_dx_kernel[grid](
        dy, w, g, dyb, lora_A, seed, dx,
        M, N, K, R, triton.next_power_of_2(M),
        dy.stride(0), dy.stride(1),
        *w_strides,
        dyb.stride(0), dyb.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        dx.stride(0), dx.stride(1),
        scaling, drop_threshold(p), 1.0 / (1.0 - p),
        DOT_PRECISION=dot_precision, BLOCK_R=lora_block_r(R), **kernel_args(quant, dx), **launch_options(quant),
    )
    return dx
