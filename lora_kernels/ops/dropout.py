"""The dropout keep-mask, shared by every kernel that touches dropout(x).

The mask is a pure function of (seed, row * K + col) for the logical (M, K) view of x: it does not
depend on tile sizes, strides or which kernel asks, so backward regenerates exactly the mask that
forward used and nothing of x's size is ever stored.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, K, p):
    """Boolean (len(rows), len(cols)) tile: True where x[row, col] is kept."""
    # int64 offsets: Triton's Philox then uses both 32-bit counters, so M*K may exceed 2**32.
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), rows, cols, K, p)
    bounds = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8), mask=bounds)


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """Materialise the (M, K) keep-mask for `seed` (a 1-element int64 tensor). For tests and debugging only."""
    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _dropout_mask_kernel[grid](seed, out, M, K, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
