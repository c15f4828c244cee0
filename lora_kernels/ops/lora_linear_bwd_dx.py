"""Backward pass 2: grad_x = dy·W + s·(dyB·A)⊙mask/(1-p) and grad_A = s·dyBᵀ·dropout_p(x).

One GEMM over (M, K) tiles streams dy and W across N. Before it, each tile regenerates the forward's dropout
mask from the seed, loads its tile of x once, masks it and multiplies it with the dyB tile into grad_A
(float32 atomics), then starts the GEMM's accumulator from the masked LoRA term; no (M, K) temporary exists.
When x needs no gradient the GEMM is skipped and only grad_A is computed. Under
torch.use_deterministic_algorithms(True) the kernel runs with one pinned config and each row block adds its
partial grad_A to its own slot instead of using atomics (configs.row_waves: a bounded number of slots, rows
beyond them in further launches), and torch sums the slots in a fixed order.

On the split path (gemm="split", see lora_kernels/backends/gemm_dispatch.py) torch's matmul (cuBLAS on a GPU)
writes dy·W into grad_x first; the kernel then skips its reduction loop, starts from that tile of grad_x
and adds the masked LoRA term in place.

A 4-bit base (QLoRA) arrives as a QuantizedWeight: the fused path dequantizes each W tile in registers where
the dense kernel loads it (W_4BIT, ops/dequant_4bit.py); the split path dequantizes W once into a buffer for
torch.mm and frees it on return. Nothing W-sized is kept from forward.
Segmented (several adapters, ops/segments.py): a row tile is a run of the rows sorted by adapter (dy, x, dyB
and grad_x addressed through the order, the mask drawn for the logical rows); otherwise only the LoRA part
changes. A is (n, r_max, K) and grad_A (n, r_max, K); the tile loops over the adapters its rows use (usually
one): s_a·dyB[rows of a]·A[a] into grad_x's starting accumulator and s_a·dyB[rows of a]ᵀ·dropout(x) into
grad_A[a], each row's mask drawn at its adapter's rate. The GEMM loop, the tiles and the tile order are those of the
single-adapter kernel.
"""
import torch
import triton
import triton.language as tl

from ..settings import GEMM_PATHS
from .configs import autotune, gemm_configs, gemm_prune, lora_block_r, pinned_config, row_waves
from .dequant_4bit import (dequant_4bit_rows, dequant_4bit_tile, dequantize_4bit, flat_bytes, kernel_args,
                           launch_options)
from .format_4bit import QuantizedWeight
from .dropout import drop_threshold, dropout_keep
from .layout import Rows, check_int32_offsets, grouped_tile, row_offsets
from .segments import AdapterTable, any_row, logical_rows, tile_adapters


@triton.jit
def _lora_dx_and_grad_a(lora, dyb_ptr, a_ptr, ga_ptr, x_ptr, x, rm, rk, rr, rows, k_ok, rank, scale, keep_scale,
                        stride_dbm, stride_dbr, stride_ar, stride_ak, stride_gar, stride_gak,
                        COMPUTE_DX: tl.constexpr, COMPUTE_GRAD_A: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """For one adapter (A at a_ptr, its grad_A slice of this row block at ga_ptr), in BLOCK_R rank chunks up to
    `rank`, with d = scale·dyB[rows] (other rows read as 0): returns lora + d·A, and adds keep_scale·dᵀ·x (x
    already masked; unused without COMPUTE_GRAD_A) to grad_A, in x's dtype. Serves the whole tile, or one
    segment of it."""
    dtype = x_ptr.dtype.element_ty
    for r0 in range(0, rank, BLOCK_R):
        r_idx = r0 + rr
        r_ok = r_idx < rank
        dyb = tl.load(dyb_ptr + rm.to(tl.int64)[:, None] * stride_dbm + r_idx[None, :] * stride_dbr,
                      mask=rows[:, None] & r_ok[None, :], other=0.0)
        dyb = (dyb * scale).to(dtype)
        if COMPUTE_DX:
            a = tl.load(a_ptr + r_idx[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            lora = tl.dot(dyb, a.to(dtype), lora, input_precision=DOT_PRECISION)
        if COMPUTE_GRAD_A:
            part = tl.dot(tl.trans(dyb), x, input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                part = part * keep_scale
            ga = ga_ptr + r_idx[:, None] * stride_gar + rk[None, :] * stride_gak
            if DETERMINISTIC:  # this row block's slot, no other program's: waves add to it in launch order
                ok = r_ok[:, None] & k_ok[None, :]
                tl.store(ga, tl.load(ga, mask=ok) + part, mask=ok)
            else:
                tl.atomic_add(ga, part, mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")  # a reduction: no ordering
    return lora


@triton.jit
def _lora_pass(acc, x, dyb_ptr, a_ptr, ga_ptr, x_ptr, rm, rk, rr, row_ok, k_ok, R, scaling, keep_scale,
               aid, first, last, rank_ptr, scale_ptr, keep_scale_ptr, stride_aa, stride_gaa, stride_dbm, stride_dbr,
               stride_ar, stride_ak, stride_gar, stride_gak, COMPUTE_DX: tl.constexpr, COMPUTE_GRAD_A: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, SEGMENTED: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """_lora_dx_and_grad_a for the tile's one adapter, or for each adapter its rows use (segmented)."""
    if SEGMENTED:
        for a_id in range(first, last + 1):
            sel = aid == a_id
            if any_row(sel):  # up to a's own rank: A[a]'s padding rows are zero
                acc = _lora_dx_and_grad_a(
                    acc, dyb_ptr, a_ptr + tl.cast(a_id, tl.int64) * stride_aa,
                    ga_ptr + tl.cast(a_id, tl.int64) * stride_gaa, x_ptr, x, rm, rk, rr, sel, k_ok,
                    tl.load(rank_ptr + a_id), tl.load(scale_ptr + a_id),
                    tl.load(keep_scale_ptr + a_id) if HAS_DROPOUT else 1.0, stride_dbm, stride_dbr,
                    stride_ar, stride_ak, stride_gar, stride_gak,
                    COMPUTE_DX, COMPUTE_GRAD_A, HAS_DROPOUT, DETERMINISTIC, DOT_PRECISION, BLOCK_R)
    else:
        acc = _lora_dx_and_grad_a(acc, dyb_ptr, a_ptr, ga_ptr, x_ptr, x, rm, rk, rr, row_ok, k_ok, R, scaling,
                                  keep_scale, stride_dbm, stride_dbr, stride_ar, stride_ak, stride_gar, stride_gak,
                                  COMPUTE_DX, COMPUTE_GRAD_A, HAS_DROPOUT, DETERMINISTIC, DOT_PRECISION, BLOCK_R)
    return acc


# Autotuning runs the kernel many times: grad_A accumulates with atomics, and the split path adds to grad_x
# in place, so each is reset between runs, only where this launch writes it (configs.output_hooks).
@autotune(configs=gemm_configs(out_block="BLOCK_K", reduce_block="BLOCK_N"),
          prune_configs_by=gemm_prune("BLOCK_K", "BLOCK_N"),
          key=["M_BUCKET", "N", "K", "R", "BASE_IN_DX", "W_4BIT", "SEGMENTED", "COMPUTE_DX", "COMPUTE_GRAD_A",
               "HAS_DROPOUT", "DETERMINISTIC", "DOT_PRECISION"],
          zero=[("grad_a_ptr", "COMPUTE_GRAD_A")], restore=[("dx_ptr", "BASE_IN_DX")])
@triton.jit
def _lora_linear_bwd_dx_kernel(
    dy_ptr, w_ptr, dyb_ptr, a_ptr, x_ptr, seed_ptr, dx_ptr, grad_a_ptr,
    row0, M, N, K, R, M_BUCKET,
    dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    stride_wn, stride_wk,
    stride_dbm, stride_dbr,
    stride_ar, stride_ak,
    x_inner, stride_x_outer, stride_x_inner, stride_xk,
    stride_dxm, stride_dxk,
    stride_gas, stride_gar, stride_gak,
    scaling, threshold, keep_scale,
    aid_ptr, order_ptr, rank_ptr, scale_ptr, threshold_ptr, keep_scale_ptr, stride_aa, stride_gaa,
    q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
    W_4BIT: tl.constexpr, Q_BLOCK: tl.constexpr, Q_BLOCK2: tl.constexpr, Q_DOUBLE: tl.constexpr,
    Q_ALIGNED: tl.constexpr,
    COMPUTE_DX: tl.constexpr, BASE_IN_DX: tl.constexpr, COMPUTE_GRAD_A: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr, SEGMENTED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The output tile is (BLOCK_M rows of x) × (BLOCK_K columns of x); BLOCK_N is the reduction step. This launch
    # covers rows row0..M-1 (deterministic mode's waves; else row0 = 0); pid_m counts its row blocks.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M - row0, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rm < M
    k_ok = rk < K
    tile_ok = row_ok[:, None] & k_ok[None, :]
    if SEGMENTED:  # the tile is a run of the rows sorted by adapter; rm is a logical row from here on
        rm = logical_rows(order_ptr, rm, row_ok)
    dtype = x_ptr.dtype.element_ty

    # The LoRA term first, then the GEMM accumulates onto it, so one float32 (BLOCK_M, BLOCK_K) accumulator is live
    # across the reduction loop; the dropout mask is drawn once and dies with the x tile before it. (Added after the
    # loop, both accumulators, the mask and x were live at once: 2-3 KB of spills per thread on sm_90 for 128x256
    # tiles, tools/sm90_budget.py.) grad_A's dyBᵀ·x runs before dyB·A, so the x tile dies before the accumulator
    # is born.
    if SEGMENTED:
        aid, first, last = tile_adapters(aid_ptr, rm, row_ok)
        if HAS_DROPOUT:  # each row is dropped at its adapter's rate (one mask, per-row thresholds)
            threshold = tl.load(threshold_ptr + aid, mask=aid >= 0, other=0)[:, None]
            keep_scale = tl.load(keep_scale_ptr + aid, mask=aid >= 0, other=0.0)[:, None]
    else:
        aid, first, last = 0, 0, 0  # unused without SEGMENTED
    rr = tl.arange(0, BLOCK_R)
    ga_ptr = grad_a_ptr + pid_m.to(tl.int64) * stride_gas
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), rm, pid_k * BLOCK_K, K, threshold, BLOCK_K)
    if COMPUTE_GRAD_A:
        x_rows = x_ptr + row_offsets(rm, x_inner, stride_x_outer, stride_x_inner)
        x = tl.load(x_rows[:, None] + rk[None, :] * stride_xk, mask=tile_ok, other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x, 0.0)
        # the grad_A pass leaves its accumulator argument as is: a typed stand-in
        _lora_pass(tl.zeros((1, 1), dtype=tl.float32), x, dyb_ptr, a_ptr, ga_ptr, x_ptr, rm, rk, rr, row_ok, k_ok, R,
                   scaling, keep_scale, aid, first, last, rank_ptr, scale_ptr, keep_scale_ptr, stride_aa, stride_gaa,
                   stride_dbm, stride_dbr, stride_ar, stride_ak, stride_gar, stride_gak, False, True, HAS_DROPOUT,
                   DETERMINISTIC, SEGMENTED, DOT_PRECISION, BLOCK_R)
    if COMPUTE_DX:
        acc = _lora_pass(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), 0.0, dyb_ptr, a_ptr, ga_ptr, x_ptr, rm, rk,
                         rr, row_ok, k_ok, R, scaling, keep_scale, aid, first, last, rank_ptr, scale_ptr,
                         keep_scale_ptr, stride_aa, stride_gaa, stride_dbm, stride_dbr, stride_ar, stride_ak,
                         stride_gar, stride_gak, True, False, HAS_DROPOUT, DETERMINISTIC, SEGMENTED, DOT_PRECISION,
                         BLOCK_R)
        if HAS_DROPOUT:
            acc = tl.where(keep, acc * keep_scale, 0.0)
        dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :] * stride_dxk  # M * K may pass 2**31
        if BASE_IN_DX:
            acc += tl.load(dx_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        else:
            dy_rows = dy_ptr + row_offsets(rm, dy_inner, stride_dy_outer, stride_dy_inner)
            rn = tl.arange(0, BLOCK_N)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + rn
                n_ok = nn < N
                dy = tl.load(dy_rows[:, None] + nn[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :],
                             other=0.0)
                if W_4BIT and Q_ALIGNED:
                    # w_ptr is bnb's packed 4-bit W: W[n, k] is element n·K + k of its flattening, dequantized here.
                    w = dequant_4bit_rows(w_ptr, nn[:, None] * K, pid_k * BLOCK_K, K, n_ok[:, None], q_absmax_ptr,
                                          q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr, Q_BLOCK, Q_BLOCK2,
                                          Q_DOUBLE, BLOCK_K).to(dtype)
                elif W_4BIT:
                    w = dequant_4bit_tile(w_ptr, nn[:, None] * K, rk[None, :], pid_k * BLOCK_K,
                                          n_ok[:, None] & k_ok[None, :], n_ok[:, None], q_absmax_ptr, q_code_ptr,
                                          q_absmax2_ptr, q_code2_ptr, q_offset_ptr, Q_BLOCK, Q_BLOCK2, Q_DOUBLE,
                                          Q_ALIGNED, BLOCK_K).to(dtype)
                else:
                    w = tl.load(w_ptr + nn[:, None] * stride_wn + rk[None, :] * stride_wk,
                                mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        tl.store(dx_ptrs, acc.to(dtype), mask=tile_ok)


def lora_linear_bwd_dx(dy: torch.Tensor, dy_rows: Rows, weight: torch.Tensor, dyb: torch.Tensor,
                       lora_A: torch.Tensor, x: torch.Tensor, x_rows: Rows, seed: torch.Tensor,
                       scaling: float, p: float, compute_dx: bool, compute_grad_a: bool, dot_precision: str,
                       gemm: str = "fused", adapters: AdapterTable = None):
    """(grad_x shaped like x in x's dtype or None, grad_A (r, K) float32 or None). weight is (N, K) in x's dtype
    or a 4-bit QuantizedWeight.

    gemm="fused": the Triton kernel computes dy·W; "split": torch.mm does, and the kernel adds to it.
    With `adapters` (segmented): lora_A is (n, r_max, K), grad_A (n, r_max, K); scaling and p are ignored
    (the table's per-adapter values apply).
    """
    if gemm not in GEMM_PATHS:
        raise ValueError(f"gemm={gemm!r} is not one of {GEMM_PATHS}")
    segmented = adapters is not None
    M, N, K, R = x_rows.M, dy.shape[-1], x.shape[-1], lora_A.shape[-2]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    dx2 = dx.view(M, K) if compute_dx else dyb
    base_in_dx = compute_dx and gemm == "split"
    quant = weight if isinstance(weight, QuantizedWeight) and compute_dx and not base_in_dx else None
    if base_in_dx:
        dense = dequantize_4bit(weight, x.dtype) if isinstance(weight, QuantizedWeight) else weight
        torch.mm(dy.reshape(M, N), dense, out=dx2)
        del dense
    if isinstance(weight, QuantizedWeight):
        w, w_strides = (flat_bytes(quant) if quant is not None else dyb), (0, 0)  # the 4-bit helper indexes flat
    else:
        if compute_dx and not base_in_dx:
            check_int32_offsets("weight", weight)
        w, w_strides = weight, (weight.stride(0), weight.stride(1))
    deterministic = compute_grad_a and torch.are_deterministic_algorithms_enabled()
    # Deterministic: one pinned config, so the row blocks (and the partial sums' grouping) never depend on timing.
    pinned = pinned_config(_lora_linear_bwd_dx_kernel) if deterministic else None
    slots, waves = row_waves(M, pinned.kwargs["BLOCK_M"] if deterministic else 0, deterministic)
    grad_shape = (slots, *lora_A.shape[:-2], R, K)  # (slots, [n,] R, K)
    grad_a = torch.zeros(grad_shape, dtype=torch.float32, device=x.device) if compute_grad_a else dyb[None, None]
    head = (dy, w, dyb, lora_A, x, seed, dx2, grad_a)
    tail = (
        N, K, R, triton.next_power_of_2(M),
        dy_rows.inner, dy_rows.stride_outer, dy_rows.stride_inner, dy_rows.stride_col,
        *w_strides,
        dyb.stride(0), dyb.stride(1),
        lora_A.stride(-2), lora_A.stride(-1),
        x_rows.inner, x_rows.stride_outer, x_rows.stride_inner, x_rows.stride_col,
        dx2.stride(0), dx2.stride(1),
        grad_a.stride(0) if deterministic else 0, grad_a.stride(-2), grad_a.stride(-1),
        *((1.0, 0, 1.0) if segmented else (scaling, drop_threshold(p), 1.0 / (1.0 - p))),
        *((adapters.row_adapter, adapters.row_order, adapters.rank, adapters.scaling, adapters.threshold,
           adapters.keep_scale, lora_A.stride(0), grad_a.stride(1)) if segmented
          else (seed, seed, seed, seed, seed, seed, 0, 0)),  # unused pointers when single
    )
    flags = dict(
        COMPUTE_DX=compute_dx, BASE_IN_DX=base_in_dx, COMPUTE_GRAD_A=compute_grad_a,
        HAS_DROPOUT=adapters.has_dropout if segmented else p > 0.0, DETERMINISTIC=deterministic,
        SEGMENTED=segmented,
        DOT_PRECISION=dot_precision, BLOCK_R=lora_block_r(R), **kernel_args(quant, dyb), **launch_options(quant),
    )
    for row0, end in waves:
        grid = lambda meta, n=end - row0: (  # noqa: E731
            triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        if deterministic:  # the jit function itself: no autotuner, no timing
            _lora_linear_bwd_dx_kernel.fn[grid](*head, row0, end, *tail, **flags, **pinned.all_kwargs())
        else:
            _lora_linear_bwd_dx_kernel[grid](*head, row0, end, *tail, **flags)
    return dx, (grad_a.sum(0) if compute_grad_a else None)
