"""Forward pass 1: xa = dropout_p(x)·Aᵀ, an (M, r) float32 matrix.

The dropout mask is generated in registers from the seed (ops/dropout.py) and the 1/(1-p) scale is
applied once to the float32 accumulator, so no dropped copy of x exists anywhere.

Segmented (several adapters, ops/segments.py): A is (n, r_max, K) and row m uses A[a(m)] with a(m)'s own
dropout rate; a row block is a run of the rows sorted by adapter (x and xa read and written through the
order); for each adapter present in the block (usually one) the block sweeps K with the rows of that adapter
(the others read as zero), masked, times A[a]. Base-only rows get xa = 0.
"""
import torch
import triton
import triton.language as tl

from .configs import autotune, lora_block_r, rowblock_configs, rowblock_prune
from .dropout import drop_threshold, dropout_keep
from .layout import Rows, row_offsets
from .segments import AdapterTable, any_row, logical_rows, tile_adapters


@triton.jit
def _sweep_k(acc, x_rows, rows, a_ptr, seed, threshold, rm, rk, rr, r_ok, K, stride_xk, stride_ar, stride_ak,
             HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + dropout(x[rows])·A[rr]ᵀ over K (other rows of x read as 0): one adapter's pass."""
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows[:, None] + kk[None, :] * stride_xk, mask=rows[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, k0, K, threshold, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak, mask=r_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(x, a.to(x.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@autotune(configs=rowblock_configs("BLOCK_K"), prune_configs_by=rowblock_prune("BLOCK_K"),
          key=["M_BUCKET", "K", "R", "SEGMENTED", "HAS_DROPOUT", "DOT_PRECISION"])
@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    x_inner, stride_x_outer, stride_x_inner, stride_xk,
    stride_ar, stride_ak,
    stride_xam, stride_xar,
    threshold, keep_scale,
    aid_ptr, order_ptr, rank_ptr, threshold_ptr, keep_scale_ptr, stride_aa,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    if SEGMENTED:  # the block is a run of the rows sorted by adapter; rm is a logical row from here on
        rm = logical_rows(order_ptr, rm, row_ok)
    x_rows = x_ptr + row_offsets(rm, x_inner, stride_x_outer, stride_x_inner)
    r_ok = rr < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    else:
        seed = 0  # not read
    if SEGMENTED:
        aid, first, last = tile_adapters(aid_ptr, rm, row_ok)
        if HAS_DROPOUT:  # each row is dropped at its adapter's rate (one mask, per-row thresholds)
            threshold = tl.load(threshold_ptr + aid, mask=aid >= 0, other=0)[:, None]
            keep_scale = tl.load(keep_scale_ptr + aid, mask=aid >= 0, other=0.0)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if SEGMENTED:
        # The adapter loop outside the k-loop, so the k-loop stays a plain loop Triton software-pipelines (inside
        # it, no load was pipelined). A block inside one adapter's run makes one pass; one across a boundary makes
        # one per adapter, reading its x tile again for the other adapter's rows only.
        for a_id in range(first, last + 1):
            sel = aid == a_id
            if any_row(sel) & (tl.program_id(1) * BLOCK_R < tl.load(rank_ptr + a_id)):
                part = _sweep_k(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_rows, sel,
                                a_ptr + tl.cast(a_id, tl.int64) * stride_aa, seed, threshold, rm, rk, rr, r_ok, K,
                                stride_xk, stride_ar, stride_ak, HAS_DROPOUT, DOT_PRECISION, BLOCK_K)
                acc = tl.where(sel[:, None], part, acc)
    else:
        acc = _sweep_k(acc, x_rows, row_ok, a_ptr, seed, threshold, rm, rk, rr, r_ok, K, stride_xk, stride_ar,
                       stride_ak, HAS_DROPOUT, DOT_PRECISION, BLOCK_K)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar, acc,
             mask=row_ok[:, None] & r_ok[None, :])


def lora_shrink(x: torch.Tensor, rows: Rows, lora_A: torch.Tensor, seed: torch.Tensor, p: float,
                dot_precision: str, adapters: AdapterTable = None) -> torch.Tensor:
    """xa (M, r) float32 for x seen through `rows` (its last dim K), lora_A (r, K) in any float dtype.

    With `adapters` (segmented): lora_A is (n, r_max, K), xa is (M, r_max), p is ignored (the table's
    per-adapter rates apply).
    """
    segmented = adapters is not None
    M, K, R = rows.M, x.shape[-1], lora_A.shape[-2]
    xa = torch.empty((M, R), dtype=torch.float32, device=x.device)
    block_r = lora_block_r(R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
    _lora_shrink_kernel[grid](
        x, lora_A, xa, seed,
        M, K, R, triton.next_power_of_2(M),
        rows.inner, rows.stride_outer, rows.stride_inner, rows.stride_col,
        lora_A.stride(-2), lora_A.stride(-1),
        xa.stride(0), xa.stride(1),
        0 if segmented else drop_threshold(p), 1.0 if segmented else 1.0 / (1.0 - p),
        *((adapters.row_adapter, adapters.row_order, adapters.rank, adapters.threshold, adapters.keep_scale,
           lora_A.stride(0)) if segmented else (seed, seed, seed, seed, seed, 0)),  # unused pointers when single
        HAS_DROPOUT=adapters.has_dropout if segmented else p > 0.0, DOT_PRECISION=dot_precision,
        SEGMENTED=segmented, BLOCK_R=block_r,
    )
    return xa

