"""Forward pass 1: xa = dropout_p(x)·Aᵀ, an (M, r) float32 matrix.

The dropout mask is generated in registers from the seed (ops/dropout.py) and the 1/(1-p) scale is
applied once to the float32 accumulator, so no dropped copy of x exists anywhere.
"""
import torch
import triton
import triton.language as tl

from .configs import lora_block_r, rowblock_configs
from .dropout import drop_threshold, dropout_keep
from .layout import Rows, row_offsets


@triton.autotune(configs=rowblock_configs("BLOCK_K"), key=["M_BUCKET", "K", "R"])
@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    x_inner, stride_x_outer, stride_x_inner, stride_xk,
    stride_ar, stride_ak,
    stride_xam, stride_xar,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + row_offsets(rm, x_inner, stride_x_outer, stride_x_inner)
    row_ok = rm < M
    r_ok = rr < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows[:, None] + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, k0, K, threshold, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, a.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(xa_ptr + rm[:, None] * stride_xam + rr[None, :] * stride_xar, acc,
             mask=row_ok[:, None] & r_ok[None, :])


def lora_shrink(x: torch.Tensor, rows: Rows, lora_A: torch.Tensor, seed: torch.Tensor, p: float,
                dot_precision: str) -> torch.Tensor:
    """xa (M, r) float32 for x seen through `rows` (its last dim K), lora_A (r, K) in any float dtype."""
    M, K, R = rows.M, x.shape[-1], lora_A.shape[0]
    xa = torch.empty((M, R), dtype=torch.float32, device=x.device)
    block_r = lora_block_r(R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
    _lora_shrink_kernel[grid](
        x, lora_A, xa, seed,
        M, K, R, triton.next_power_of_2(M),
        rows.inner, rows.stride_outer, rows.stride_inner, rows.stride_col,
        lora_A.stride(0), lora_A.stride(1),
        xa.stride(0), xa.stride(1),
        drop_threshold(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0.0, DOT_PRECISION=dot_precision, BLOCK_R=block_r,
    )
    return xa
