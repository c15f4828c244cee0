"""MoE experts, the adapter gradients: G_e = s·lᵀ·dropout_p(d) over the rows of each expert e, one (r, C) block.

One kernel serves both LoRA weight gradients of a grouped projection (backends/triton_experts.py):

    grad_A_e  = s·dyB_eᵀ·dropout_p(x_e)     l = dyB, d = x,  written into rows e·r … e·r+r-1 of (r·E, in)
    grad_B_eᵀ = s·xa_eᵀ·dy_e                 l = xa,  d = dy, written into columns e, E+e, … of (out, r·E)

The grid is (experts hit, column blocks, r-blocks); each program loops over its expert's rows (run offsets from
ops/expert_tiles.py) in BLOCK_M steps and stores its block once: no atomics (under
torch.use_deterministic_algorithms the row step is a pinned config's, so the order of the sums is fixed), and
nothing besides the gradients themselves ((r·E, in) and (out, r·E)) is allocated. An expert without rows has
no program: its gradient is the zero the launcher's caller initialised. The dropout mask is the forward's: drawn
for the sorted row and the column from the seed (ops/dropout.py).
"""
import torch
import triton
import triton.language as tl

from .configs import autotune, grouped_grad_configs, grouped_grad_prune, lora_block_r, pinned_config
from .dropout import drop_threshold, dropout_keep
from .expert_tiles import ExpertTiles


@autotune(configs=grouped_grad_configs(), prune_configs_by=grouped_grad_prune(),
          key=["S_BUCKET", "C", "R", "HAS_DROPOUT", "DOT_PRECISION"])
@triton.jit
def _grouped_lora_grad_kernel(
    l_ptr, d_ptr, out_ptr, seed_ptr, offsets_ptr, hit_ptr,
    C, R, S_BUCKET,
    stride_lm, stride_lr,
    stride_dm, stride_dc,
    stride_oe, stride_or, stride_oc,
    scaling, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    expert = tl.load(hit_ptr + tl.program_id(0))
    c0 = tl.program_id(1) * BLOCK_C
    rc = c0 + tl.arange(0, BLOCK_C)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_ok = rc < C
    r_ok = rr < R
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    dtype = d_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < end
        rows64 = rm.to(tl.int64)
        lo = tl.load(l_ptr + rows64[:, None] * stride_lm + rr[None, :] * stride_lr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        d = tl.load(d_ptr + rows64[:, None] * stride_dm + rc[None, :] * stride_dc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            d = tl.where(dropout_keep(seed, rm, c0, C, threshold, BLOCK_C), d, 0.0)
        acc = tl.dot(tl.trans((lo * scaling).to(dtype)), d, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    out = out_ptr + expert.to(tl.int64) * stride_oe + rr[:, None] * stride_or + rc[None, :] * stride_oc
    tl.store(out, acc, mask=r_ok[:, None] & c_ok[None, :])


def grouped_lora_grad(l: torch.Tensor, d: torch.Tensor, tiles: ExpertTiles, out: torch.Tensor, out_strides,
                      scaling: float, seed: torch.Tensor, p: float, dot_precision: str) -> torch.Tensor:
    """Writes the G_e of every expert hit into `out` (float32; zeros for the others, as the caller allocates it),
    G_e[j, c] at out_strides (expert, rank, column); returns out. l: (S, r) float32, d: (S, C) activations sorted
    by expert."""
    S, C = d.shape
    R, hit = l.shape[1], tiles.hit.shape[0]
    if hit == 0:
        return out
    block_r = lora_block_r(R)
    grid = lambda meta: (hit, triton.cdiv(C, meta["BLOCK_C"]), triton.cdiv(R, block_r))  # noqa: E731
    # The row step sets the order of each expert's sum: under torch.use_deterministic_algorithms it is the pinned
    # config's, never a timing's, so gradients are bitwise equal across runs and processes.
    deterministic = torch.are_deterministic_algorithms_enabled()
    kernel = _grouped_lora_grad_kernel.fn if deterministic else _grouped_lora_grad_kernel
    pinned = pinned_config(_grouped_lora_grad_kernel).all_kwargs() if deterministic else {}
    kernel[grid](
        l, d, out, seed, tiles.offsets, tiles.hit,
        C, R, triton.next_power_of_2(max(S, 1)),
        l.stride(0), l.stride(1),
        d.stride(0), d.stride(1),
        *out_strides,
        scaling, drop_threshold(p), 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0.0, DOT_PRECISION=dot_precision, BLOCK_R=block_r, **pinned,
    )
    return out
