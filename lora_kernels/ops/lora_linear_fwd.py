"""Forward pass 2: y = x·Wᵀ + b + s·xa·Bᵀ in one GEMM.

The base GEMM streams x and W over K; the LoRA expand (xa is (M, r), B is (N, r)) and the bias are
added to the same float32 accumulator before the single store of y, so no (M, N) temporary exists.

The split path (gemm="split", chosen per shape by lora_kernels/backends/gemm_dispatch.py) lets torch's matmul
(cuBLAS on a GPU) write x·Wᵀ into y first; the same kernel then skips its k-loop, starts its accumulator
from that tile of y and adds the LoRA term and bias in place. That costs one more read and write of y,
and wins where cuBLAS's GEMM beats Triton's by more than that.

A 4-bit base (QLoRA: bitsandbytes NF4/FP4, ops/format_4bit.py) arrives as a QuantizedWeight. The fused
path reads its packed bytes and dequantizes each W tile in registers where the dense kernel loads it (W_4BIT,
ops/dequant_4bit.py), so only 0.5 B per weight crosses memory; the split path dequantizes W once into a
buffer for torch.mm and frees it on return.
Segmented (several adapters, ops/segments.py): a row tile is a run of the rows sorted by adapter, its rows
of x gathered and of y (and xa) read and written through the order; otherwise only the LoRA epilogue changes.
B is (n, N, r_max); the tile loops over the adapters its rows use (usually one) and adds s_a·xa[rows of a]·B[a]ᵀ,
so the k-loop, the tiles and the tile order are those of the single-adapter kernel. On the split path
torch.mm writes x·Wᵀ in logical order and the kernel adds to it through the order.
"""
import torch
import triton
import triton.language as tl

from ..settings import GEMM_PATHS
from .configs import autotune, gemm_configs, gemm_prune, lora_block_r
from .dequant_4bit import (dequant_4bit_rows, dequant_4bit_tile, dequantize_4bit, flat_bytes, kernel_args,
                           launch_options)
from .format_4bit import QuantizedWeight
from .layout import Rows, check_int32_offsets, grouped_tile, row_offsets
from .segments import AdapterTable, any_row, logical_rows, tile_adapters


@triton.jit
def _add_expand(acc, xa_ptr, b_ptr, y_ptr, rm, rn, rr, rows, col_ok, rank, scale, stride_xam, stride_xar,
                stride_bn, stride_br, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scale·xa[rows, :rank]·B[:, :rank]ᵀ in BLOCK_R rank chunks (rr = arange(BLOCK_R)), in y's dtype (as
    PEFT's lora_B runs); rows not selected read xa as 0. One adapter's expand: the tile's, or one segment's."""
    dtype = y_ptr.dtype.element_ty
    for r0 in range(0, rank, BLOCK_R):
        r_idx = r0 + rr
        r_ok = r_idx < rank
        xa = tl.load(xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + r_idx[None, :] * stride_xar,
                     mask=rows[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + r_idx[:, None] * stride_br,
                    mask=col_ok[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot((xa * scale).to(dtype), b.to(dtype), acc, input_precision=DOT_PRECISION)
    return acc


# On the split path the kernel adds to y in place and autotuning runs it many times: y is put back after each
# run there, and only there (the fused path overwrites y: no copy of it is made).
@autotune(configs=gemm_configs(out_block="BLOCK_N", reduce_block="BLOCK_K"), prune_configs_by=gemm_prune("BLOCK_N", "BLOCK_K"),
          key=["M_BUCKET", "N", "K", "R", "BASE_IN_Y", "W_4BIT", "SEGMENTED", "HAS_BIAS", "DOT_PRECISION"],
          restore=[("y_ptr", "BASE_IN_Y")])
@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    x_inner, stride_x_outer, stride_x_inner, stride_xk,
    stride_wn, stride_wk,
    stride_xam, stride_xar,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling,
    aid_ptr, order_ptr, rank_ptr, scale_ptr, stride_ba,
    q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
    HAS_BIAS: tl.constexpr, BASE_IN_Y: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    W_4BIT: tl.constexpr, Q_BLOCK: tl.constexpr, Q_BLOCK2: tl.constexpr, Q_DOUBLE: tl.constexpr,
    Q_ALIGNED: tl.constexpr, SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if SEGMENTED:  # the tile is a run of the rows sorted by adapter; rm is a logical row from here on
        rm = logical_rows(order_ptr, rm, row_ok)
    # int64 row offsets: M * N may pass 2**31 elements.
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn

    if BASE_IN_Y:
        acc = tl.load(y_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        x_rows = x_ptr + row_offsets(rm, x_inner, stride_x_outer, stride_x_inner)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_rows[:, None] + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_4BIT and Q_ALIGNED:
                # w_ptr is bnb's packed 4-bit W: W[n, k] is element n·K + k of its flattening, dequantized here
                # as a (BLOCK_N, BLOCK_K) tile (bytes run along k) and transposed for the dot.
                w = tl.trans(dequant_4bit_rows(w_ptr, rn[:, None] * K, k0, K, col_ok[:, None], q_absmax_ptr, q_code_ptr,
                                               q_absmax2_ptr, q_code2_ptr, q_offset_ptr, Q_BLOCK, Q_BLOCK2, Q_DOUBLE,
                                               BLOCK_K)).to(x.dtype)
            elif W_4BIT:
                w = dequant_4bit_tile(w_ptr, rn[None, :] * K, kk[:, None], k0, col_ok[None, :] & k_ok[:, None],
                                      col_ok[None, :], q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr,
                                      q_offset_ptr, Q_BLOCK, Q_BLOCK2, Q_DOUBLE, Q_ALIGNED, BLOCK_K).to(x.dtype)
            else:
                w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                            mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    # LoRA expand: s·xa·Bᵀ in the activation dtype (as PEFT's lora_B runs), accumulated in float32.
    rr = tl.arange(0, BLOCK_R)
    if SEGMENTED:
        aid, first, last = tile_adapters(aid_ptr, rm, row_ok)
        for a_id in range(first, last + 1):
            sel = aid == a_id
            if any_row(sel):
                # up to a's own rank: B[a]'s padding columns are zero
                acc = _add_expand(acc, xa_ptr, b_ptr + tl.cast(a_id, tl.int64) * stride_ba, y_ptr, rm, rn, rr, sel,
                                  col_ok, tl.load(rank_ptr + a_id), tl.load(scale_ptr + a_id), stride_xam,
                                  stride_xar, stride_bn, stride_br, DOT_PRECISION, BLOCK_R)
    else:
        acc = _add_expand(acc, xa_ptr, b_ptr, y_ptr, rm, rn, rr, row_ok, col_ok, R, scaling, stride_xam, stride_xar,
                          stride_bn, stride_br, DOT_PRECISION, BLOCK_R)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


def lora_linear_fwd(x: torch.Tensor, rows: Rows, weight: torch.Tensor, bias, xa: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dot_precision: str, gemm: str = "fused",
                    adapters: AdapterTable = None) -> torch.Tensor:
    """y of shape (*x.shape[:-1], N) in x's dtype. weight (N, K) and bias (N,) are in x's dtype, or weight is a
    4-bit QuantizedWeight.

    gemm="fused": the Triton kernel computes x·Wᵀ; "split": torch.mm does, and the kernel adds to it.
    With `adapters` (segmented): lora_B is (n, N, r_max) and the table's per-adapter scalings apply.
    """
    if gemm not in GEMM_PATHS:
        raise ValueError(f"gemm={gemm!r} is not one of {GEMM_PATHS}")
    segmented = adapters is not None
    M, K = rows.M, x.shape[-1]
    N, R = weight.shape[0], lora_B.shape[-1]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    y2 = y.view(M, N)
    quant = weight if isinstance(weight, QuantizedWeight) else None
    if gemm == "split":
        dense = weight if quant is None else dequantize_4bit(quant, x.dtype)
        # reshape is a view for every layout rows_of accepts with one row group; otherwise torch copies x.
        torch.mm(x.reshape(M, K), dense.t(), out=y2)
        del dense
        quant = None  # the kernel only adds the LoRA term: it never reads W
    if isinstance(weight, QuantizedWeight):
        w, w_strides = (flat_bytes(quant) if quant is not None else y2), (0, 0)  # the 4-bit helper indexes flat
    else:
        if gemm == "fused":
            check_int32_offsets("weight", weight)
        w, w_strides = weight, (weight.stride(0), weight.stride(1))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lora_linear_fwd_kernel[grid](
        x, w, bias if bias is not None else y2, xa, lora_B, y2,
        M, N, K, R, triton.next_power_of_2(M),
        rows.inner, rows.stride_outer, rows.stride_inner, rows.stride_col,
        *w_strides,
        xa.stride(0), xa.stride(1),
        lora_B.stride(-2), lora_B.stride(-1),
        y2.stride(0), y2.stride(1),
        scaling,
        *((adapters.row_adapter, adapters.row_order, adapters.rank, adapters.scaling, lora_B.stride(0))
          if segmented else (xa, xa, xa, xa, 0)),  # unused pointers when single
        HAS_BIAS=bias is not None, BASE_IN_Y=gemm == "split", DOT_PRECISION=dot_precision,
        BLOCK_R=lora_block_r(R), SEGMENTED=segmented, **kernel_args(quant, y2), **launch_options(quant),
    )
    return y
