"""MoE experts, the GEMM pass: out = a·V_e (+ b_e) + mask ⊙ (s·l·U_e)/(1-p) for the rows of each expert e.

One kernel serves the two GEMM-shaped products of a grouped LoRA projection (backends/triton_experts.py):

    forward   y      = x·W_eᵀ + b_e + s·xa·B_eᵀ                        a = x,  V_e = W_eᵀ, l = xa,  U_e = B_eᵀ
    backward  grad_x = dy·W_e + s·(dyB·A_e)⊙mask/(1-p)                 a = dy, V_e = W_e,  l = dyB, U_e = A_e

W_e is the frozen (E, out, in) parameter's slice, or gpt-oss's transposed (E, in, out) one, and A_e / B_e are
PEFT's (r·E, in) / (out, r·E) adapter tensors: all read through strides, no per-expert copy. A program owns one
tile of ops/expert_tiles.py's table (rows of one expert) and one block of output columns. The LoRA term is
computed first (r is small), the mask of backward applied to it (drawn for the sorted row and the column from
the seed, the forward's mask), and the base GEMM accumulates onto it, so one float32 accumulator is live across
the reduction loop and nothing (S, out)-sized is written besides the output. As the dense kernels do, the LoRA
operands run in the activation dtype (PEFT's lora_B does), accumulated in float32.

The split path (gemm="split", chosen per shape by backends/gemm_dispatch.py) lets torch._grouped_mm (the op
under torch's functional grouped_mm; one call, CUTLASS on sm_90 / sm_100 for bfloat16) write a·V_e; the same
kernel then skips its reduction loop and adds the LoRA term and bias to that output in place: one more read and
write of the output, no other buffer.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..settings import GEMM_PATHS
from .configs import autotune, grouped_gemm_configs, grouped_gemm_prune, lora_block_r
from .dropout import drop_threshold, dropout_keep
from .expert_tiles import ExpertTiles, tile_rows
from .layout import check_int32_offsets


# On the split path the kernel adds to the output in place and autotuning runs it many times: the output is put
# back after each run there, and only there.
@autotune(configs=grouped_gemm_configs(), prune_configs_by=grouped_gemm_prune(),
          key=["S_BUCKET", "C", "RED", "R", "BLOCK_M", "HAS_BIAS", "HAS_DROPOUT", "BASE_IN_OUT", "DOT_PRECISION"],
          restore=[("out_ptr", "BASE_IN_OUT")])
@triton.jit
def _grouped_lora_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, l_ptr, u_ptr, out_ptr, seed_ptr, table_ptr,
    C, RED, R, S_BUCKET,
    stride_am, stride_ak,
    stride_we, stride_wk, stride_wc,
    stride_be, stride_bc,
    stride_lm, stride_lr,
    stride_ue, stride_ur, stride_uc,
    stride_om, stride_oc,
    scaling, threshold, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BASE_IN_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr,
):
    expert, rm, row_ok = tile_rows(table_ptr, BLOCK_M)
    c0 = tl.program_id(1) * BLOCK_C
    rc = c0 + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    tile_ok = row_ok[:, None] & c_ok[None, :]
    dtype = out_ptr.dtype.element_ty
    rows64 = rm.to(tl.int64)
    out_ptrs = out_ptr + rows64[:, None] * stride_om + rc[None, :] * stride_oc

    # The LoRA term, in BLOCK_R rank chunks (R = 0: no adapter, the loop is empty).
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    u_base = u_ptr + expert * stride_ue
    for r0 in range(0, R, BLOCK_R):
        r_idx = r0 + rr
        r_ok = r_idx < R
        lo = tl.load(l_ptr + rows64[:, None] * stride_lm + r_idx[None, :] * stride_lr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        u = tl.load(u_base + r_idx[:, None] * stride_ur + rc[None, :] * stride_uc, mask=r_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc = tl.dot((lo * scaling).to(dtype), u.to(dtype), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), rm, c0, C, threshold, BLOCK_C)
        acc = tl.where(keep, acc * keep_scale, 0.0)

    if BASE_IN_OUT:  # split: grouped_mm wrote a·V_e here
        acc += tl.load(out_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        a_rows = a_ptr + rows64 * stride_am
        w_base = w_ptr + expert * stride_we
        rk = tl.arange(0, BLOCK_RED)
        for k0 in range(0, RED, BLOCK_RED):
            kk = k0 + rk
            k_ok = kk < RED
            a = tl.load(a_rows[:, None] + kk[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + kk[:, None] * stride_wk + rc[None, :] * stride_wc, mask=k_ok[:, None] & c_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, w.to(dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + rc * stride_bc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(dtype), mask=tile_ok)


def grouped_mm_refusal(a: torch.Tensor, weight: torch.Tensor, w_strides, out_features: int) -> Optional[str]:
    """Why torch's grouped_mm cannot compute a·V_e (V_e: weight read with w_strides) with V_e as a view, or None.

    Its rules (torch 2.13's checks on CPU; on CUDA those torch/_meta_registrations.py mirrors): float32, bfloat16
    or float16, one dtype for both operands, each operand's row or column stride 1 and the other a multiple of 16
    bytes. a's layout is not a reason: the launcher copies an a it cannot take (a broadcast gradient, say). The
    reduction and output widths must be 16-byte multiples (an output with other rows comes back padded), and the
    expert offset too: CUTLASS wants each expert's base pointer 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no grouped_mm"
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch's grouped_mm takes float32, bfloat16 and float16, not {a.dtype}"
    if weight.dtype != a.dtype:
        return f"the weight is {weight.dtype} and the activations {a.dtype}: grouped_mm wants one dtype"
    align = 16 // a.element_size()
    s_e, s_red, s_c = w_strides
    if (s_red != 1 and s_c != 1) or max(s_red, s_c) % align or s_e % align or weight.data_ptr() % 16:
        return f"the weight's strides {tuple(w_strides)} are not a row- or column-major matrix with 16-byte rows"
    if a.shape[1] % align or out_features % align:
        return (f"the reduction width {a.shape[1]} or the output width {out_features} is not a multiple of "
                f"16 bytes ({align} {str(a.dtype).replace('torch.', '')} values)")
    return None


def _grouped_mm_rows(a: torch.Tensor) -> torch.Tensor:
    """a as grouped_mm takes it: row-major, 16-byte aligned rows and base pointer (a copy only where not)."""
    align = 16 // a.element_size()
    if a.stride(1) == 1 and a.stride(0) % align == 0 and a.data_ptr() % 16 == 0:
        return a
    return a.clone(memory_format=torch.contiguous_format)


def grouped_lora_gemm(a: torch.Tensor, tiles: ExpertTiles, weight: torch.Tensor, w_strides, bias, lora,
                      scaling: float, seed: torch.Tensor, p: float, out_features: int,
                      dot_precision: str, gemm: str = "fused") -> torch.Tensor:
    """(S, out_features) in a's dtype for a (S, RED) sorted by expert.

    weight: the 3-D base parameter, w_strides: (expert, reduction, output column) strides of V_e in it; bias: (E,
    out_features) or None; lora: (l (S, r) float32, u, u_strides (expert, rank, column), r) or None (no adapter);
    p > 0 masks the LoRA term (backward). Rows past the last tile (pairs routed to no local expert) are zero.
    gemm="fused": the kernel computes a·V_e; "split": torch's grouped_mm does (grouped_mm_refusal must be None),
    and the kernel adds the rest to it."""
    if gemm not in GEMM_PATHS:
        raise ValueError(f"gemm={gemm!r} is not one of {GEMM_PATHS}")
    S, RED = a.shape
    split = gemm == "split" and tiles.num_tiles > 0
    if split:
        # V_e as grouped_mm's (E, RED, out) operand: a view of the parameter, no copy.
        v = weight.as_strided((weight.shape[0], RED, out_features), w_strides, weight.storage_offset())
        out = torch._grouped_mm(_grouped_mm_rows(a), v, offs=tiles.offsets[1:])
    else:
        check_int32_offsets("weight", weight[0])  # the expert's offset is int64, offsets within W_e int32
        out = torch.empty((S, out_features), dtype=a.dtype, device=a.device)
    if tiles.routed < S:
        out[tiles.routed:].zero_()  # grouped_mm too leaves the rows past offs[-1] as they were allocated
    if tiles.num_tiles == 0 or (split and lora is None and bias is None):  # nothing (left) to add
        return out
    l, u, u_strides, rank = lora if lora is not None else (out, out, (0, 0, 0), 0)
    grid = lambda meta: (tiles.num_tiles, triton.cdiv(out_features, meta["BLOCK_C"]))  # noqa: E731
    _grouped_lora_gemm_kernel[grid](
        a, weight, bias if bias is not None else out, l, u, out, seed, tiles.table,
        out_features, RED, rank, triton.next_power_of_2(S),
        a.stride(0), a.stride(1),
        *w_strides,
        *((bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)),
        l.stride(0), l.stride(1),
        *u_strides,
        out.stride(0), out.stride(1),
        scaling, drop_threshold(p), 1.0 / (1.0 - p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, BASE_IN_OUT=split, DOT_PRECISION=dot_precision,
        BLOCK_R=lora_block_r(max(rank, 1)), BLOCK_M=tiles.block_m,
    )
    return out
