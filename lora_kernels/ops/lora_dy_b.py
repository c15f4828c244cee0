"""Backward pass 1: dyB = dy·B (M, r) and grad_B = s·dyᵀ·xa (N, r), in one pass over dy.

Each program owns a block of rows and streams dy across N: the (BLOCK_M, r) dyB tile stays in
registers, and each (BLOCK_N, r) slice of grad_B is added to a float32 buffer with atomics, so dy is
read once for both products. Under torch.use_deterministic_algorithms(True) the kernel runs with one pinned
config and each row block adds its partial grad_B to its own slot instead (configs.row_waves: a bounded number
of slots, rows beyond them in further launches), and torch sums the slots in a fixed order.

Segmented (several adapters, ops/segments.py): B is (n, N, r_max) and grad_B (n, N, r_max). A row block is a
run of the rows sorted by adapter (dy, xa and dyB addressed through the order); each dy tile is loaded once
per adapter present in the row block (usually one); for each, the block sweeps N with the rows of that adapter
(the others read as zero), multiplied with B[a] into dyB and with s_a·xa into grad_B[a]. Base-only rows get dyB = 0 and
add nothing to any grad_B.
"""
import torch
import triton
import triton.language as tl

from .configs import autotune, lora_block_r, pinned_config, row_waves, rowblock_configs, rowblock_prune
from .layout import Rows, row_offsets
from .segments import AdapterTable, any_row, logical_rows, tile_adapters


@triton.jit
def _dyb_and_grad_b(acc, dy, xa, b_ptr, gb_ptr, nn, rr, n_ok, r_ok, stride_bn, stride_br, stride_gbn, stride_gbr,
                    COMPUTE_DYB: tl.constexpr, COMPUTE_GRAD_B: tl.constexpr, DETERMINISTIC: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One n-step of one adapter (B at b_ptr, its grad_B slice of this row block at gb_ptr) for the rows of dy
    (rows of other adapters zeroed): returns acc + dy·B[nn, rr] and adds dyᵀ·xa (xa already scaled) to grad_B.
    Serves the whole row block, or one segment of it."""
    if COMPUTE_DYB:
        b = tl.load(b_ptr + nn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0)
        acc = tl.dot(dy, b.to(dy.dtype), acc, input_precision=DOT_PRECISION)
    if COMPUTE_GRAD_B:
        part = tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION)
        gb = gb_ptr + nn[:, None] * stride_gbn + rr[None, :] * stride_gbr
        if DETERMINISTIC:  # this row block's slot, no other program's: waves add to it in launch order
            ok = n_ok[:, None] & r_ok[None, :]
            tl.store(gb, tl.load(gb, mask=ok) + part, mask=ok)
        else:
            tl.atomic_add(gb, part, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")  # a reduction: no ordering
    return acc


@triton.jit
def _sweep_n(acc, dy_rows, rows, xa, b_ptr, gb_ptr, N, start, rn, rr, r_ok, stride_dyn, stride_bn, stride_br,
             stride_gbn, stride_gbr, COMPUTE_DYB: tl.constexpr, COMPUTE_GRAD_B: tl.constexpr,
             DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One adapter's pass over N for the rows `rows` of the block (other rows of dy read as 0), starting at column
    block `start` and wrapping around: programs that start apart add to different grad_B rows at any one time,
    where a sweep in lockstep from column 0 has every row block's atomics collide on the same lines."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    for i in range(0, n_blocks):
        nn = ((start + i) % n_blocks) * BLOCK_N + rn
        n_ok = nn < N
        dy = tl.load(dy_rows[:, None] + nn[None, :] * stride_dyn, mask=rows[:, None] & n_ok[None, :], other=0.0)
        acc = _dyb_and_grad_b(acc, dy, xa, b_ptr, gb_ptr, nn, rr, n_ok, r_ok, stride_bn, stride_br, stride_gbn,
                              stride_gbr, COMPUTE_DYB, COMPUTE_GRAD_B, DETERMINISTIC, DOT_PRECISION)
    return acc


# grad_B accumulates with atomics: zeroed between autotuning runs, only where this launch computes it.
@autotune(configs=rowblock_configs("BLOCK_N"), prune_configs_by=rowblock_prune("BLOCK_N"),
          key=["M_BUCKET", "N", "R", "SEGMENTED", "COMPUTE_DYB", "COMPUTE_GRAD_B", "DETERMINISTIC", "DOT_PRECISION"],
          zero=[("grad_b_ptr", "COMPUTE_GRAD_B")])
@triton.jit
def _lora_dy_b_kernel(
    dy_ptr, b_ptr, xa_ptr, dyb_ptr, grad_b_ptr,
    row0, M, N, R, M_BUCKET,
    dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    stride_bn, stride_br,
    stride_xam, stride_xar,
    stride_dbm, stride_dbr,
    stride_gbs, stride_gbn, stride_gbr,
    scaling,
    aid_ptr, order_ptr, rank_ptr, scale_ptr, stride_ba, stride_gba,
    COMPUTE_DYB: tl.constexpr, COMPUTE_GRAD_B: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SEGMENTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)  # this launch's row blocks cover rows row0..M-1 (row0 > 0: deterministic waves)
    rm = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    row_ok = rm < M
    r_ok = rr < R
    if SEGMENTED:  # the block is a run of the rows sorted by adapter; rm is a logical row from here on
        rm = logical_rows(order_ptr, rm, row_ok)
    dy_rows = dy_ptr + row_offsets(rm, dy_inner, stride_dy_outer, stride_dy_inner)
    dtype = dy_ptr.dtype.element_ty
    if SEGMENTED:
        aid, first, last = tile_adapters(aid_ptr, rm, row_ok)
        scaling = tl.load(scale_ptr + aid, mask=aid >= 0, other=0.0)[:, None]  # each row its adapter's s
    if COMPUTE_GRAD_B:
        xa = tl.load(xa_ptr + rm.to(tl.int64)[:, None] * stride_xam + rr[None, :] * stride_xar,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        xa = (xa * scaling).to(dtype)
    else:
        xa = 0.0  # no grad_B: _dyb_and_grad_b does not read it

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    start = pid_m % tl.cdiv(N, BLOCK_N)
    if SEGMENTED:
        # The adapter loop outside the n-loop: the n-loop stays a plain loop Triton software-pipelines (inside it,
        # no load of dy was pipelined). A block inside one adapter's run makes one pass; one across a boundary
        # makes one per adapter, reading its dy tile again for the other adapter's rows only.
        for a_id in range(first, last + 1):
            sel = aid == a_id
            if any_row(sel) & (tl.program_id(1) * BLOCK_R < tl.load(rank_ptr + a_id)):
                part = _sweep_n(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), dy_rows, sel,
                                tl.where(sel[:, None], xa, 0.0) if COMPUTE_GRAD_B else xa,
                                b_ptr + tl.cast(a_id, tl.int64) * stride_ba,
                                grad_b_ptr + pid_m.to(tl.int64) * stride_gbs + tl.cast(a_id, tl.int64) * stride_gba,
                                N, start, rn, rr, r_ok, stride_dyn, stride_bn, stride_br, stride_gbn, stride_gbr,
                                COMPUTE_DYB, COMPUTE_GRAD_B, DETERMINISTIC, DOT_PRECISION, BLOCK_N)
                acc = tl.where(sel[:, None], part, acc)
    else:
        acc = _sweep_n(acc, dy_rows, row_ok, xa, b_ptr, grad_b_ptr + pid_m.to(tl.int64) * stride_gbs, N, start, rn,
                       rr, r_ok, stride_dyn, stride_bn, stride_br, stride_gbn, stride_gbr,
                       COMPUTE_DYB, COMPUTE_GRAD_B, DETERMINISTIC, DOT_PRECISION, BLOCK_N)
    if COMPUTE_DYB:
        tl.store(dyb_ptr + rm.to(tl.int64)[:, None] * stride_dbm + rr[None, :] * stride_dbr, acc,
                 mask=row_ok[:, None] & r_ok[None, :])


def lora_dy_b(dy: torch.Tensor, rows: Rows, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float,
              compute_dyb: bool, compute_grad_b: bool, dot_precision: str, adapters: AdapterTable = None):
    """(dyB (M, r) float32 or None, grad_B (N, r) float32 or None) for dy seen through `rows`.

    With `adapters` (segmented): lora_B is (n, N, r_max), grad_B (n, N, r_max), scalings from the table.
    """
    segmented = adapters is not None
    M, N, R = rows.M, dy.shape[-1], lora_B.shape[-1]
    # Segmented, a row block may hold no adapter or several: dyB rows are written by every program (zeros
    # for base-only rows), grad_B slices of adapters absent from a block are left as zero-initialised.
    dyb = torch.empty((M, R), dtype=torch.float32, device=dy.device) if compute_dyb else xa
    deterministic = compute_grad_b and torch.are_deterministic_algorithms_enabled()
    # Deterministic: one pinned config, so the row blocks (and the partial sums' grouping) never depend on timing.
    pinned = pinned_config(_lora_dy_b_kernel) if deterministic else None
    slots, waves = row_waves(M, pinned.kwargs["BLOCK_M"] if deterministic else 0, deterministic)
    grad_shape = (slots, *lora_B.shape[:-2], N, R)  # (slots, [n,] N, R)
    grad_b = torch.zeros(grad_shape, dtype=torch.float32, device=dy.device) if compute_grad_b else xa[None, None]
    block_r = lora_block_r(R)
    tail = (
        N, R, triton.next_power_of_2(M),
        rows.inner, rows.stride_outer, rows.stride_inner, rows.stride_col,
        lora_B.stride(-2), lora_B.stride(-1),
        xa.stride(0), xa.stride(1),
        dyb.stride(0), dyb.stride(1),
        grad_b.stride(0) if deterministic else 0, grad_b.stride(-2), grad_b.stride(-1),
        scaling,
        *((adapters.row_adapter, adapters.row_order, adapters.rank, adapters.scaling, lora_B.stride(0),
           grad_b.stride(1)) if segmented else (xa, xa, xa, xa, 0, 0)),  # unused pointers when single
    )
    flags = dict(COMPUTE_DYB=compute_dyb, COMPUTE_GRAD_B=compute_grad_b, DETERMINISTIC=deterministic,
                 DOT_PRECISION=dot_precision, BLOCK_R=block_r, SEGMENTED=segmented)
    for row0, end in waves:
        grid = lambda meta, n=end - row0: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
        if deterministic:  # the jit function itself: no autotuner, no timing
            _lora_dy_b_kernel.fn[grid](dy, lora_B, xa, dyb, grad_b, row0, end, *tail, **flags, **pinned.all_kwargs())
        else:
            _lora_dy_b_kernel[grid](dy, lora_B, xa, dyb, grad_b, row0, end, *tail, **flags)
    return (dyb if compute_dyb else None), (grad_b.sum(0) if compute_grad_b else None)
