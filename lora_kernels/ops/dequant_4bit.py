"""Dequantize bitsandbytes' 4-bit weights (NF4/FP4, optional double quantization) in registers.

`dequant_4bit` is the jit helper the GEMM kernels call where they load a tile of W: given the flat indices
n·K + k of the tile's elements it returns their float32 values, so the packed bytes (0.5 B per weight) are
all that crosses memory and no W-sized temporary exists. The format is described in format_4bit.py;
the result rounded to the compute dtype equals bitsandbytes.functional.dequantize_4bit bit for bit.

`dequantize_4bit` (the launcher below) writes the whole W once: the split GEMM path ("dequantize to a buffer,
then cuBLAS") and the tests use it.

Exactness on a GPU: the double-quantized scale is fl(fl(code2·absmax2) + offset), two roundings, as bnb computes
it (two kernels). LLVM would contract that multiply and add into one FMA (one rounding), so every kernel that
calls dequant_4bit with DOUBLE_QUANT is launched with enable_fp_fusion=False (`launch_options` below). The
tensor-core tl.dot is unaffected; only the epilogue's scalar multiply-adds lose their FMA.
"""
import torch
import triton
import triton.language as tl

from .format_4bit import QuantizedWeight, code_table
from .layout import check_int32_offsets


@triton.jit
def _codes(packed_ptr, idx, mask, code_ptr):
    """code[q] (float32) for the nibbles q of the elements at flat indices idx."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    # Even elements sit in the high nibble (bnb packs q[2j] << 4 | q[2j + 1]).
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    # A 64-byte table: the gather stays in L1. Loading it (rather than a where-tree of constants) keeps FP4's
    # -0.0 at index 8 exactly as bnb's kernels produce it.
    return tl.load(code_ptr + nibble, mask=mask, other=0.0)


@triton.jit
def _scales(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, BLOCKSIZE2: tl.constexpr,
            DOUBLE_QUANT: tl.constexpr):
    """The float32 absmax of blocks `block`: stored, or fl(fl(code2[a]·absmax2[block // BLOCKSIZE2]) + offset).

    One return after an if/else, not a return inside the if: Triton's compiler types every return of a function,
    also one after a constexpr branch that returned, and under DOUBLE_QUANT the stored absmax is uint8 (the
    interpreter never noticed; tests/test_triton_compile.py compiles this for sm_90)."""
    if DOUBLE_QUANT:
        q_absmax = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q_absmax, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // BLOCKSIZE2,
                                                                              mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def dequant_4bit(packed_ptr, idx, mask, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 values of the elements at flat (row-major) indices `idx` (int32, any shape) where `mask`; 0 elsewhere.

    BLOCKSIZE / BLOCKSIZE2 are powers of two (constexpr): the block index is a shift, not an integer division.
    """
    return _codes(packed_ptr, idx, mask, code_ptr) * _scales(idx // BLOCKSIZE, mask, absmax_ptr, absmax2_ptr,
                                                             code2_ptr, offset_ptr, BLOCKSIZE2, DOUBLE_QUANT)


@triton.jit
def dequant_4bit_tile(packed_ptr, row_start, col, col0, mask, row_mask, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr,
                      offset_ptr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      ROWS_ALIGNED: tl.constexpr, TILE_COLS: tl.constexpr):
    """float32 W[n, k] for a GEMM tile: row_start = n·K and col = k broadcast against each other (either
    orientation), col0 the tile's first column, a multiple of TILE_COLS; row_mask: n < N, broadcastable like
    row_start.

    ROWS_ALIGNED (K a multiple of BLOCKSIZE) with TILE_COLS <= BLOCKSIZE: every row of the tile lies in one
    quantization block, so one scale per row is loaded instead of one per element (the double-quant chain too).
    The product code·scale is the same float32 multiply either way: bit for bit the same values.
    """
    idx = row_start + col
    if ROWS_ALIGNED and TILE_COLS <= BLOCKSIZE:
        scale = _scales((row_start + col0) // BLOCKSIZE, row_mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        BLOCKSIZE2, DOUBLE_QUANT)
        return _codes(packed_ptr, idx, mask, code_ptr) * scale
    return dequant_4bit(packed_ptr, idx, mask, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)


@triton.jit
def dequant_4bit_rows(packed_ptr, row_start, k0, K, row_mask, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      TILE_COLS: tl.constexpr):
    """float32 W[n, k0 : k0 + TILE_COLS] as a (rows, TILE_COLS) tile, for rows n given as row_start = n·K (rows, 1)
    and row_mask = n < N. K is a multiple of BLOCKSIZE (so no byte and no quantization block crosses a row) and k0
    a multiple of TILE_COLS.

    Each packed byte is loaded once, as a (rows, TILE_COLS / 2) tile of contiguous bytes, and split into its two
    nibbles (high: the even column); each quantization block's scale is loaded once per row. (Indexing every
    element loaded each byte twice, one byte at a time, and each scale once per element: on sm_90 the pipelined
    copies of those per-element loads took 311-475 KB of shared memory for the backward's wide tiles,
    tools/sm90_budget.py.) The products code·scale are the same float32 multiplies: bit for bit the same values.
    """
    HALF: tl.constexpr = TILE_COLS // 2
    j = tl.arange(0, HALF)
    byte = tl.load(packed_ptr + (row_start + k0) // 2 + j[None, :], mask=row_mask & (k0 + 2 * j < K)[None, :],
                   other=0).to(tl.int32)
    # A 64-byte table: the gathers stay in L1; bytes masked off read code[0] and get a zero scale below.
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 0xF))
    if TILE_COLS <= BLOCKSIZE:
        scale = _scales((row_start + k0) // BLOCKSIZE, row_mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                        BLOCKSIZE2, DOUBLE_QUANT)
        hi = hi * scale
        lo = lo * scale
    else:
        BLOCKS: tl.constexpr = TILE_COLS // BLOCKSIZE
        b = tl.arange(0, BLOCKS)
        scale = _scales((row_start + k0) // BLOCKSIZE + b[None, :], row_mask & (k0 + b * BLOCKSIZE < K)[None, :],
                        absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, BLOCKSIZE2, DOUBLE_QUANT)[:, :, None]
        ROWS: tl.constexpr = byte.shape[0]
        hi = (hi.reshape(ROWS, BLOCKS, BLOCKSIZE // 2) * scale).reshape(ROWS, HALF)
        lo = (lo.reshape(ROWS, BLOCKS, BLOCKSIZE // 2) * scale).reshape(ROWS, HALF)
    return tl.interleave(hi, lo)  # bnb packs q[2j] << 4 | q[2j + 1]


@triton.jit
def _dequant_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
                         BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    w = dequant_4bit(packed_ptr, idx, ok, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                     BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=ok)


def check_indexable(qw: QuantizedWeight) -> None:
    """The kernels index W's flattening in int32 (cheap shifts and masks per element)."""
    N, K = qw.shape
    if N * K >= 2**31:
        raise ValueError(f"a 4-bit weight of shape {(N, K)} has {N * K} elements; the 4-bit kernels index at most "
                         "2**31 - 1")


def kernel_args(qw, placeholder: torch.Tensor) -> dict:
    """Keyword arguments of a GEMM kernel taking an optional 4-bit W (W_4BIT): qw's pointers and constexprs, or
    placeholders (never read) when qw is None."""
    if qw is None:
        return dict(q_absmax_ptr=placeholder, q_code_ptr=placeholder, q_absmax2_ptr=placeholder,
                    q_code2_ptr=placeholder, q_offset_ptr=placeholder,
                    W_4BIT=False, Q_BLOCK=1, Q_BLOCK2=1, Q_DOUBLE=False, Q_ALIGNED=False)
    check_indexable(qw)
    dq = qw.double_quant
    return dict(q_absmax_ptr=qw.absmax, q_code_ptr=code_table(qw.quant_type, qw.device),
                q_absmax2_ptr=qw.nested_absmax if dq else qw.absmax, q_code2_ptr=qw.nested_code if dq else qw.absmax,
                q_offset_ptr=qw.offset if dq else qw.absmax,
                W_4BIT=True, Q_BLOCK=qw.blocksize, Q_BLOCK2=qw.nested_blocksize if dq else 1, Q_DOUBLE=dq,
                Q_ALIGNED=qw.shape[1] % qw.blocksize == 0)


def launch_options(qw) -> dict:
    """Compile options for a kernel that dequantizes qw: no FMA contraction where the double-quantized scale
    must round twice (module docstring). Ignored by the interpreter."""
    return {"enable_fp_fusion": False} if qw is not None and qw.double_quant else {}


def flat_bytes(qw: QuantizedWeight) -> torch.Tensor:
    """The packed data as a flat uint8 view (bnb may store it as another quant_storage dtype)."""
    return qw.packed.reshape(-1).view(torch.uint8)


def weight_operand(weight):
    """(quant or None, the tensor a kernel's w_ptr gets, its (row, column) strides) for a dense W or a
    QuantizedWeight: a 4-bit W goes in as its flat bytes, which the 4-bit helpers index themselves."""
    if isinstance(weight, QuantizedWeight):
        return weight, flat_bytes(weight), (0, 0)
    check_int32_offsets("weight", weight)
    return None, weight, (weight.stride(0), weight.stride(1))


def dequantize_4bit(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor = None) -> torch.Tensor:
    """W (N, K) in `dtype`, written once by one kernel (a W-sized buffer: the split path's, and the tests')."""
    check_indexable(qw)
    N, K = qw.shape
    if out is None:
        out = torch.empty((N, K), dtype=dtype, device=qw.device)
    elif tuple(out.shape) != (N, K) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({N}, {K}) tensor, got {tuple(out.shape)} strides {out.stride()}")
    args = kernel_args(qw, out)
    BLOCK = 1024
    _dequant_4bit_kernel[(triton.cdiv(N * K, BLOCK),)](
        flat_bytes(qw), args["q_absmax_ptr"], args["q_code_ptr"], args["q_absmax2_ptr"], args["q_code2_ptr"],
        args["q_offset_ptr"], out, N * K,
        BLOCKSIZE=qw.blocksize, BLOCKSIZE2=args["Q_BLOCK2"], DOUBLE_QUANT=qw.double_quant, BLOCK=BLOCK,
        **launch_options(qw),
    )
    return out
