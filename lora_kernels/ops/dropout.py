"""The dropout keep-mask, shared by every kernel that touches dropout(x).

The mask is a pure function of (seed, row, col) for the logical (M, K) view of x: it does not depend on
tile sizes, strides or which kernel asks, so backward regenerates exactly the mask that forward used and
nothing of x's size is ever stored.

One Philox-4x32-10 call yields four 32-bit words; each serves one of four neighbouring columns (as
torch's own CUDA dropout uses curand_uniform4), which makes the mask four times cheaper to generate than
one call per element. For element (row, col):

    counter = row * ceil(K / 4) + col // 4          (int64: both 32-bit Philox counters, M*K may pass 2**32)
    bits    = tl.randint4x(seed, counter)[col % 4]
    keep    = (bits >> 8) >= floor(p * 2**24)        (24 random bits against p: resolution 2**-24)

csrc/philox.cuh implements the same function for the CUDA extension, bit for bit.
"""
import torch
import triton
import triton.language as tl

# keep = (bits >> 8) >= threshold: 24 random bits per element.
THRESHOLD_BITS = 24


def drop_threshold(p: float) -> int:
    """The integer the kernels compare 24 random bits with: an element is dropped with probability
    floor(p * 2**24) / 2**24, within 2**-24 of p. (The product is exact in double; int() floors p >= 0.)"""
    return int(p * float(1 << THRESHOLD_BITS))


@triton.jit
def dropout_bits(seed, rows, col0, K, BLOCK_COLS: tl.constexpr):
    """(len(rows), BLOCK_COLS) uint32 random words for columns col0 .. col0 + BLOCK_COLS; col0 % 4 == 0."""
    tl.static_assert(BLOCK_COLS % 4 == 0, "dropout tiles cover whole groups of four columns")
    groups = col0 // 4 + tl.arange(0, BLOCK_COLS // 4)
    counters = rows.to(tl.int64)[:, None] * ((K + 3) // 4) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # interleave(a, b)[2j] = a[j], [2j + 1] = b[j]: this order puts word l of group j at column 4j + l.
    return tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))


@triton.jit
def dropout_keep(seed, rows, col0, K, threshold, BLOCK_COLS: tl.constexpr):
    """Boolean (len(rows), BLOCK_COLS) tile: True where x[row, col0 + j] is kept; col0 % 4 == 0."""
    return (dropout_bits(seed, rows, col0, K, BLOCK_COLS) >> 8).to(tl.int32) >= threshold


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), rows, col0, K, threshold, BLOCK_K)
    bounds = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8), mask=bounds)


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """Materialise the (M, K) keep-mask for `seed` (a 1-element int64 tensor). For tests and debugging only."""
    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _dropout_mask_kernel[grid](seed, out, M, K, drop_threshold(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
