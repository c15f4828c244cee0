"""DoRA forward: y and v in one GEMM pass, g = m / n applied per output column in the epilogue.

    p = 0:  v = x·Wᵀ + s·xa·Bᵀ                      y = g·v + b
    p > 0:  v = xd·Wᵀ + s·xa·Bᵀ  (xd = dropout(x))  y = x·Wᵀ + b − xd·Wᵀ + g·v
            = x·Wᵀ + b + (g − 1)·(xd·Wᵀ) + g·s·xa·Bᵀ, PEFT's DoRA output with dropout.

xa = xd·Aᵀ comes from ops/lora_shrink.py (the same seed). With dropout each k-step loads the x and W tiles
once and feeds two MMAs: x·Wᵀ and, with the Philox keep-mask of ops/dropout.py applied to the x tile in
registers, xd·Wᵀ; the 1/(1−p) scale is applied once to that accumulator. No dropped copy of x exists.
v (the DoRA direction's output per column, what m's gradient needs) is stored beside y in y's dtype.

A 4-bit base (QLoRA, ops/format_4bit.py) arrives as a QuantizedWeight: each W tile is dequantized in registers
where the dense kernel loads it (W_4BIT, ops/dequant_4bit.py, as in lora_linear_fwd.py), so with dropout both
MMAs of a k-step share one dequantized tile. There is no split path: W is never dequantized to a buffer here.
"""
import torch
import triton
import triton.language as tl

from .configs import gemm_configs, lora_block_r
from .dequant_4bit import dequant_4bit_rows, dequant_4bit_tile, kernel_args, launch_options, weight_operand
from .dropout import drop_threshold, dropout_keep
from .layout import Rows, grouped_tile, row_offsets
from .lora_linear_fwd import _add_expand


@triton.autotune(configs=gemm_configs(out_block="BLOCK_N", reduce_block="BLOCK_K"),
                 key=["M_BUCKET", "N", "K", "R", "DROPOUT", "W_4BIT"])
@triton.jit
def _dora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, g_ptr, seed_ptr, y_ptr, v_ptr,
    M, N, K, R, M_BUCKET,
    x_inner, stride_x_outer, stride_x_inner, stride_xk,
    stride_wn, stride_wk,
    stride_xam, stride_xar,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    stride_vm, stride_vn,
    scaling, threshold, keep_scale,
    q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    W_4BIT: tl.constexpr, Q_BLOCK: tl.constexpr, Q_BLOCK2: tl.constexpr, Q_DOUBLE: tl.constexpr,
    Q_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x_rows = x_ptr + row_offsets(rm, x_inner, stride_x_outer, stride_x_inner)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows[:, None] + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if W_4BIT and Q_ALIGNED:  # bnb's packed W: element n·K + k of its flattening, a (BLOCK_N, BLOCK_K) tile
            w = tl.trans(dequant_4bit_rows(w_ptr, rn[:, None] * K, k0, K, col_ok[:, None], q_absmax_ptr, q_code_ptr,
                                           q_absmax2_ptr, q_code2_ptr, q_offset_ptr, Q_BLOCK, Q_BLOCK2, Q_DOUBLE,
                                           BLOCK_K)).to(x.dtype)
        elif W_4BIT:
            w = dequant_4bit_tile(w_ptr, rn[None, :] * K, kk[:, None], k0, col_ok[None, :] & k_ok[:, None],
                                  col_ok[None, :], q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
                                  Q_BLOCK, Q_BLOCK2, Q_DOUBLE, Q_ALIGNED, BLOCK_K).to(x.dtype)
        else:
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if DROPOUT:  # the second MMA on the same tiles, x masked in registers
            xd = tl.where(dropout_keep(seed, rm, k0, K, threshold, BLOCK_K), x, 0.0)
            acc_d = tl.dot(xd, w, acc_d, input_precision=DOT_PRECISION)

    g = tl.load(g_ptr + rn, mask=col_ok, other=0.0)[None, :]
    rr = tl.arange(0, BLOCK_R)
    if DROPOUT:
        acc_d = acc_d * keep_scale
        v = _add_expand(acc_d, xa_ptr, b_ptr, y_ptr, rm, rn, rr, row_ok, col_ok, R, scaling, stride_xam,
                        stride_xar, stride_bn, stride_br, DOT_PRECISION, BLOCK_R)
        y = acc - acc_d + g * v
    else:
        v = _add_expand(acc, xa_ptr, b_ptr, y_ptr, rm, rn, rr, row_ok, col_ok, R, scaling, stride_xam,
                        stride_xar, stride_bn, stride_br, DOT_PRECISION, BLOCK_R)
        y = g * v
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows64 = rm.to(tl.int64)[:, None]  # M * N may pass 2**31 elements
    tl.store(y_ptr + rows64 * stride_ym + rn[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(v_ptr + rows64 * stride_vm + rn[None, :] * stride_vn, v.to(v_ptr.dtype.element_ty), mask=tile_ok)


def dora_linear_fwd(x: torch.Tensor, rows: Rows, weight: torch.Tensor, bias, xa: torch.Tensor, lora_B: torch.Tensor,
                    g: torch.Tensor, seed: torch.Tensor, scaling: float, p: float, dot_precision: str):
    """(y, v), both of shape (*x.shape[:-1], N) in x's dtype. weight (N, K) in x's dtype or a 4-bit
    QuantizedWeight, bias (N,) in x's dtype; xa (M, r) as lora_shrink returns it with the same seed and p;
    lora_B (N, r) any float dtype; g (N,) float32."""
    M, K = rows.M, x.shape[-1]
    N, R = weight.shape[0], lora_B.shape[-1]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    v = torch.empty_like(y)
    y2, v2 = y.view(M, N), v.view(M, N)
    quant, w, w_strides = weight_operand(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _dora_linear_fwd_kernel[grid](
        x, w, bias if bias is not None else y2, xa, lora_B, g, seed, y2, v2,
        M, N, K, R, triton.next_power_of_2(M),
        rows.inner, rows.stride_outer, rows.stride_inner, rows.stride_col,
        *w_strides,
        xa.stride(0), xa.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        y2.stride(0), y2.stride(1),
        v2.stride(0), v2.stride(1),
        scaling, drop_threshold(p), 1.0 / (1.0 - p),
        HAS_BIAS=bias is not None, DROPOUT=p > 0.0, DOT_PRECISION=dot_precision, BLOCK_R=lora_block_r(R),
        **kernel_args(quant, y2), **launch_options(quant),
    )
    return y, v
