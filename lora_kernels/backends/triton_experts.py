"""LoRA on MoE experts on the Triton backend: a fixed number of kernel launches per projection, whatever E.

    forward   xa = dropout(x_e)·A_eᵀ                               ops/grouped_lora_shrink.py
              y  = x_e·W_eᵀ (+ b_e) + s·xa·B_eᵀ                     ops/grouped_lora_gemm.py
    backward  dyB = dy_e·B_e                                        ops/grouped_lora_shrink.py
              grad_x = dy_e·W_e + s·(dyB·A_e)⊙mask/(1-p)           ops/grouped_lora_gemm.py
              grad_A_e = s·dyB_eᵀ·dropout(x_e)                      ops/grouped_lora_grad.py
              grad_B_e = s·dy_eᵀ·xa_e                               ops/grouped_lora_grad.py

2 launches forward and up to 4 backward per projection (one fewer each without an adapter): the row-tiled
ones walk the forward's tile table (ops/expert_tiles.py, built once per ExpertRouting and shared by both
projections), the gradient ones loop over the rows of each expert hit. A_e / B_e are read in PEFT's (r·E, in) /
(out, r·E) tensors and W_e in the 3-D parameter, (E, out, in) or gpt-oss's (E, in, out), by strides. Saved for
backward, as on the torch path (backends/experts.py): the routed input, the (S, r) float32 shrink and the seed;
the dropout mask (one per token–expert pair: per sorted row) is the dense kernels' Philox mask, drawn again.

The base product of each GEMM pass (x·W_eᵀ forward, dy·W_e for grad_x) runs inside the grouped kernel (fused)
or in torch's grouped_mm, one call whatever E, with the kernel adding the LoRA term and bias in place (split),
chosen per shape (gemm_dispatch.py, passes "experts_fwd" / "experts_bwd"). auto offers split only where
grouped_mm takes the operands as they are (ops/grouped_lora_gemm.grouped_mm_refusal) and, on CUDA, where it
runs its one grouped kernel: bfloat16 on compute capability 9.x / 10.x (elsewhere torch's CUDA grouped_mm
loops over the groups after copying the offsets to the host).

A base weight or bias that requires grad is not handled here: functional.fused_grouped_lora_linear keeps
such a call on the torch path.
"""
import torch

from ..settings import requested_gemm
from .base import draw_seed, no_seed, on_device_of
from .gemm_dispatch import choose as choose_gemm
from .gemm_dispatch import gemm_key
from .triton import dot_precision


def _lora_a_strides(lora_A: torch.Tensor, r: int):
    """(expert, rank, column) strides of A_e[j, k] = lora_A[e·r + j, k]."""
    return r * lora_A.stride(0), lora_A.stride(0), lora_A.stride(1)


def _lora_bt_strides(lora_B: torch.Tensor, num_experts: int):
    """(expert, rank, column) strides of B_eᵀ[j, n] = lora_B[n, j·E + e] (lora_B viewed (out, r, E))."""
    return lora_B.stride(1), num_experts * lora_B.stride(1), lora_B.stride(0)


def _weight_strides(weight: torch.Tensor, transposed: bool, backward: bool):
    """(expert, reduction, output column) strides of W_e as the GEMM reads it: forward x·W_eᵀ reduces over in
    and writes out; backward dy·W_e reduces over out and writes in."""
    s_e, s_1, s_2 = weight.stride()
    out_in = (s_1, s_2) if not transposed else (s_2, s_1)  # strides of W_e[n, k] along out n and in k
    return (s_e, out_in[0], out_in[1]) if backward else (s_e, out_in[1], out_in[0])


def _one_grouped_launch(a: torch.Tensor) -> bool:
    """Whether torch's grouped_mm runs as one grouped kernel on a's device: its CUTLASS path (bfloat16, sm_90 /
    sm_100, as torch 2.10's aten/src/ATen/native/cuda/GroupedBlas.cpp selects it; not checked on 2.13 nor on a
    GPU here); off CUDA auto never measures."""
    if a.device.type != "cuda":
        return True
    return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device)[0] in (9, 10)


def _gemm_path(key, a, weight, w_strides, out_features, run) -> str:
    """fused or split for one GEMM pass: LORA_KERNELS_GEMM, else gemm_dispatch's choice where split can run."""
    from ..ops.grouped_lora_gemm import grouped_mm_refusal

    refusal = grouped_mm_refusal(a, weight, w_strides, out_features)
    requested = requested_gemm()
    if requested == "split" and refusal is not None:
        raise ValueError(f"LORA_KERNELS_GEMM=split: torch's grouped_mm cannot compute the MoE experts' base GEMM "
                         f"({key.describe()}): {refusal}; set LORA_KERNELS_GEMM=auto or fused")
    if requested == "auto" and (refusal is not None or not _one_grouped_launch(a)):
        return "fused"
    return choose_gemm(key, a.device, run)


@on_device_of(0)
def _forward(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, transposed, seed):
    """(y, xa or None): forward passes 1 and 2, launched on x's device."""
    from ..ops.grouped_lora_gemm import grouped_lora_gemm
    from ..ops.grouped_lora_shrink import grouped_lora_shrink

    E, precision = routing.num_experts, dot_precision(x.dtype)
    tiles = routing.tiles(x.device)
    xa = lora = None
    if lora_A is not None:
        r = lora_A.shape[0] // E
        xa = grouped_lora_shrink(x, tiles, lora_A, _lora_a_strides(lora_A, r), r, seed, dropout_p, precision)
        lora = (xa, lora_B, _lora_bt_strides(lora_B, E), r)
    out_features = weight.shape[2] if transposed else weight.shape[1]
    w_strides = _weight_strides(weight, transposed, backward=False)
    run = lambda gemm: grouped_lora_gemm(x, tiles, weight, w_strides, bias, lora, scaling, seed,  # noqa: E731
                                         0.0, out_features, precision, gemm)
    if tiles.num_tiles == 0:  # no routed rows: no GEMM to place
        return run("fused"), xa
    key = gemm_key("experts_fwd", x, tiles.routed, x.shape[1], out_features, lora[3] if lora else 0, experts=E,
                   bias=bias is not None)
    return run(_gemm_path(key, x, weight, w_strides, out_features, run)), xa


@on_device_of(1)
def _backward(dy, x, xa, seed, weight, lora_A, lora_B, routing, s, p, transposed, need_x, need_a, need_b):
    """(grad_x, grad_A, grad_B), None where not needed: backward passes 1 to 4, launched on x's device."""
    from ..ops.grouped_lora_gemm import grouped_lora_gemm
    from ..ops.grouped_lora_grad import grouped_lora_grad
    from ..ops.grouped_lora_shrink import grouped_lora_shrink

    E, precision = routing.num_experts, dot_precision(x.dtype)
    tiles = routing.tiles(x.device)
    has_lora = lora_A is not None
    grad_x = grad_a = grad_b = dyb = None
    if has_lora:
        r = lora_A.shape[0] // E
        a_strides, bt_strides = _lora_a_strides(lora_A, r), _lora_bt_strides(lora_B, E)
        if need_x or need_a:
            dyb = grouped_lora_shrink(dy, tiles, lora_B, bt_strides, r, seed, 0.0, precision)
    if need_x:
        lora = (dyb, lora_A, a_strides, r) if has_lora else None
        w_strides, p_x = _weight_strides(weight, transposed, backward=True), p if has_lora else 0.0
        run = lambda gemm: grouped_lora_gemm(dy, tiles, weight, w_strides, None, lora, s, seed,  # noqa: E731
                                             p_x, x.shape[1], precision, gemm)
        path = "fused"
        if tiles.num_tiles:
            key = gemm_key("experts_bwd", x, tiles.routed, x.shape[1], dy.shape[1], r if has_lora else 0,
                           experts=E, dropout=p_x > 0.0)
            path = _gemm_path(key, dy, weight, w_strides, x.shape[1], run)
        grad_x = run(path)
    if has_lora and need_a:
        buf = torch.zeros(lora_A.shape, dtype=torch.float32, device=x.device)  # experts without rows: 0
        grad_a = grouped_lora_grad(dyb, x, tiles, buf, _lora_a_strides(buf, r), s, seed, p, precision)
        grad_a = grad_a.to(lora_A.dtype)
    if has_lora and need_b:
        buf = torch.zeros(lora_B.shape, dtype=torch.float32, device=x.device)
        grad_b = grouped_lora_grad(xa, dy, tiles, buf, _lora_bt_strides(buf, E), s, seed, 0.0, precision)
        grad_b = grad_b.to(lora_B.dtype)
    return grad_x, grad_a, grad_b


class TritonGroupedLoraFunction(torch.autograd.Function):
    """GroupedLoraFunction's contract (backends/experts.py) on the grouped Triton kernels; weight and bias frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, routing, scaling: float, dropout_p: float, transposed: bool):
        seed = draw_seed(x.device) if lora_A is not None and dropout_p > 0.0 else no_seed(x.device)
        y, xa = _forward(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, transposed, seed)
        ctx.save_for_backward(x, xa, seed, weight, lora_A, lora_B)
        ctx.routing, ctx.scaling, ctx.dropout_p, ctx.transposed = routing, scaling, dropout_p, transposed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, seed, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x, grad_a, grad_b = _backward(dy.to(x.dtype), x, xa, seed, weight, lora_A, lora_B, ctx.routing,
                                           ctx.scaling, ctx.dropout_p, ctx.transposed, need_x, need_a, need_b)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None
