"""MoE experts, the r-column pass: out = dropout_p(x)·U_eᵀ for the rows of each expert e, an (S, r) float32 matrix.

One kernel serves two products of a grouped LoRA projection (backends/triton_experts.py):

    forward   xa  = dropout_p(x)·A_eᵀ     U_e = A_e, rows e·r … e·r+r-1 of PEFT's lora_A (r·E, in)
    backward  dyB = dy·B_e                U_e = B_eᵀ, columns e, E+e, … of PEFT's lora_B (out, r·E)

U_e is addressed through strides (expert offset, rank stride, column stride), so both come straight from PEFT's
tensors, with no per-expert copy. Programs own one tile of ops/expert_tiles.py's table (rows of one expert)
and one r-block; the dropout mask is drawn for the sorted row (each token–expert pair its own row) and the
column, from the seed (ops/dropout.py), and 1/(1-p) scales the float32 accumulator once.
"""
import torch
import triton
import triton.language as tl

from .configs import autotune, grouped_rowblock_configs, grouped_rowblock_prune, lora_block_r
from .dropout import drop_threshold, dropout_keep
from .expert_tiles import ExpertTiles, tile_rows


@autotune(configs=grouped_rowblock_configs("BLOCK_K"), prune_configs_by=grouped_rowblock_prune("BLOCK_K"),
          key=["S_BUCKET", "K", "R", "BLOCK_M", "HAS_DROPOUT", "DOT_PRECISION"])
@triton.jit
def _grouped_lora_shrink_kernel(
    x_ptr, u_ptr, out_ptr, seed_ptr, table_ptr,
    K, R, S_BUCKET,
    stride_xm, stride_xk,
    stride_ue, stride_ur, stride_uk,
    stride_om, stride_or,
    threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    expert, rm, row_ok = tile_rows(table_ptr, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    r_ok = rr < R
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm
    u_base = u_ptr + expert * stride_ue
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows[:, None] + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, k0, K, threshold, BLOCK_K), x, 0.0)
        u = tl.load(u_base + rr[None, :] * stride_ur + kk[:, None] * stride_uk, mask=r_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(x, u.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rr[None, :] * stride_or, acc,
             mask=row_ok[:, None] & r_ok[None, :])


def grouped_lora_shrink(x: torch.Tensor, tiles: ExpertTiles, u: torch.Tensor, u_strides, rank: int,
                        seed: torch.Tensor, p: float, dot_precision: str) -> torch.Tensor:
    """(S, rank) float32 for x (S, K) sorted by expert. u: the tensor holding every U_e, u_strides: (expert, rank,
    column) strides of U_e[j, k] in it. Rows past the last tile (pairs routed to no local expert) are zero."""
    S, K = x.shape
    out = torch.empty((S, rank), dtype=torch.float32, device=x.device)
    if tiles.routed < S:
        out[tiles.routed:].zero_()
    if tiles.num_tiles == 0:
        return out
    block_r = lora_block_r(rank)
    grid = (tiles.num_tiles, triton.cdiv(rank, block_r))
    _grouped_lora_shrink_kernel[grid](
        x, u, out, seed, tiles.table,
        K, rank, triton.next_power_of_2(S),
        x.stride(0), x.stride(1),
        *u_strides,
        out.stride(0), out.stride(1),
        drop_threshold(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0.0, DOT_PRECISION=dot_precision, BLOCK_M=tiles.block_m, BLOCK_R=block_r,
    )
    return out
