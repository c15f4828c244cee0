"""The torch backend: the LoRA linear in plain PyTorch, on any device and in float64 too.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

Same memory contract as the kernels: it saves x, xa = dropout(x)·Aᵀ and a seed, never the mask or a
dropped copy of x; backward regenerates the mask from a torch.Generator seeded with the forward's seed.
Its mask is not the kernels' Philox mask (torch's CPU and CUDA generators differ): the same seed drops
the same elements only within this backend and device type.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import (LoraLinearFunction, MultiLoraLinearFunction, QLoraLinearFunction, dequantize, draw_seed, fake_bwd,
                   fake_multi_bwd, fake_multi_fwd, flat, no_seed, not_computed, qlora_ops)


def torch_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """This backend's dropout keep-mask: a pure function of (seed, shape, device type)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


@torch.library.custom_op("lora_kernels::torch_lora_fwd", mutates_args=())
def torch_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """(y, xa = dropout(x)·Aᵀ in x's dtype and shape (..., r), seed)."""
    dt = x.dtype
    A, B = lora_A.to(dt), lora_B.to(dt)
    if dropout_p > 0.0:
        seed = draw_seed(x.device)
        keep = torch_keep_mask(int(seed.item()), x.shape, dropout_p, x.device)
        xa = F.linear(x * keep.to(dt), A) * (1.0 / (1.0 - dropout_p))
        del keep
    else:
        seed = no_seed(x.device)
        xa = F.linear(x, A)
    y = F.linear(x, weight, bias) + scaling * F.linear(xa, B)
    return y, xa, seed


@torch_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((*x.shape[:-1], lora_A.shape[0])), x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("lora_kernels::torch_lora_bwd", mutates_args=())
def torch_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor,
                   lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float, need_x: bool,
                   need_lora_a: bool, need_lora_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B), each empty when not needed."""
    s, p, dt = scaling, dropout_p, x.dtype
    dy = dy.to(dt)
    A, B = lora_A.to(dt), lora_B.to(dt)
    dy2, x2, xa2 = flat(dy), flat(x), flat(xa)
    keep = None
    if p > 0.0 and (need_x or need_lora_a):
        keep = flat(torch_keep_mask(int(seed.item()), x.shape, p, x.device)).to(dt) * (1.0 / (1.0 - p))
    dyb = dy2 @ B if (need_x or need_lora_a) else None
    grad_x, grad_a, grad_b = not_computed(x), not_computed(lora_A), not_computed(lora_B)
    if need_x:
        lora_dx = (dyb @ A) * s
        if keep is not None:
            lora_dx = lora_dx * keep
        grad_x = (dy2 @ weight.to(dt) + lora_dx).reshape(x.shape)
    if need_lora_a:
        xd = x2 if keep is None else x2 * keep
        grad_a = ((dyb.t() @ xd) * s).to(lora_A.dtype)
    if need_lora_b:
        grad_b = ((dy2.t() @ xa2) * s).to(lora_B.dtype)
    return grad_x, grad_a, grad_b


torch_lora_bwd.register_fake(fake_bwd)


class TorchLoraLinear(LoraLinearFunction):
    """Torch backend: plain PyTorch ops, any device, float16/bfloat16/float32/float64."""

    fwd_op = torch.ops.lora_kernels.torch_lora_fwd
    bwd_op = torch.ops.lora_kernels.torch_lora_bwd


# QLoRA: the same math with W dequantized by this package's own PyTorch code (ops/format_4bit.dequantize, bit for
# bit bitsandbytes'). The W-sized temporary lives for one op call only; backward dequantizes again.
def _qlora_fwd(x, qweight, bias, lora_A, lora_B, scaling, dropout_p):
    return torch_lora_fwd(x, dequantize(qweight, x.dtype), bias, lora_A, lora_B, scaling, dropout_p)


def _qlora_bwd(dy, x, xa, seed, qweight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b):
    # grad_x alone reads W: without it nothing is dequantized.
    weight = dequantize(qweight, x.dtype) if need_x else x.new_empty((0,))
    return torch_lora_bwd(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a,
                          need_lora_b)


class TorchQLoraLinear(QLoraLinearFunction):
    """Torch backend over a 4-bit base."""

    qfwd_op, qbwd_op = qlora_ops("torch", _qlora_fwd, _qlora_bwd, xa_flat=False)


def unavailable_reason(x: torch.Tensor):
    """The torch backend runs anything fused_lora_linear accepts."""
    return None


# Several adapters in one batch (base.py's multi-adapter contract), without a Python loop over adapters:
# the adapters are laid side by side (A as (n·r_max, K), B as (N, n·r_max)) and each row keeps only its own
# adapter's r_max columns of x·A_catᵀ (a one-hot row mask), so the expand is one matmul whose other columns
# are zero. It computes every adapter's shrink for every row (n times the LoRA FLOPs of one adapter, still
# small next to the base GEMM): this is the reference/CPU path, the kernels do the segmented work.

def _per_row(values, row_adapter, dtype):
    """values[a(m)] for every row, 0 for base rows (-1 indexes the appended 0)."""
    table = torch.tensor([*values, 0.0], dtype=dtype, device=row_adapter.device)
    return table[row_adapter.long()]


def torch_multi_keep(x2, seed, row_adapter, dropout_ps):
    """keep-mask · 1/(1-p) of (M, K) x2 with each row at its adapter's rate (one torch mask, per-row
    thresholds: rows of an adapter with p = 0 are all kept), in x2's dtype; None without dropout."""
    if not any(p > 0.0 for p in dropout_ps):
        return None
    gen = torch.Generator(device=x2.device)
    gen.manual_seed(int(seed.item()))
    p_rows = _per_row(dropout_ps, row_adapter, torch.float64)
    keep = torch.rand(x2.shape, generator=gen, device=x2.device) >= p_rows[:, None]
    return keep.to(x2.dtype) * (1.0 / (1.0 - p_rows)).to(x2.dtype)[:, None]


def _one_hot(row_adapter, n, dtype):
    """(M, n, 1): 1 where row m uses adapter a."""
    return (row_adapter.long()[:, None] == torch.arange(n, device=row_adapter.device)).to(dtype)[:, :, None]


@torch.library.custom_op("lora_kernels::torch_multi_lora_fwd", mutates_args=())
def torch_multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                         lora_B: torch.Tensor, row_adapter: torch.Tensor, row_order: torch.Tensor, ranks: List[int],
                         scalings: List[float], dropout_ps: List[float]) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(y, xa (M, r_max) in x's dtype, seed). row_order is not needed: the matmuls take the rows as they are."""
    dt = x.dtype
    n, r_max, K = lora_A.shape
    x2 = flat(x)
    seed = draw_seed(x.device) if any(p > 0.0 for p in dropout_ps) else no_seed(x.device)
    keep = torch_multi_keep(x2, seed, row_adapter, dropout_ps)
    xd = x2 if keep is None else x2 * keep
    del keep
    own = _one_hot(row_adapter, n, dt)
    xa = ((xd @ lora_A.to(dt).reshape(n * r_max, K).t()).view(-1, n, r_max) * own).sum(1)
    s = torch.tensor(scalings, dtype=dt, device=x.device)[None, :, None]
    xa_wide = (own * s * xa[:, None, :]).reshape(-1, n * r_max)
    y = F.linear(x2, weight, bias) + xa_wide @ lora_B.to(dt).permute(1, 0, 2).reshape(-1, n * r_max).t()
    return y.reshape(*x.shape[:-1], weight.shape[0]), xa, seed


torch_multi_lora_fwd.register_fake(fake_multi_fwd())


@torch.library.custom_op("lora_kernels::torch_multi_lora_bwd", mutates_args=())
def torch_multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor,
                         weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, row_adapter: torch.Tensor,
                         row_order: torch.Tensor, ranks: List[int], scalings: List[float], dropout_ps: List[float],
                         need_x: bool, need_lora_a: bool, need_lora_b: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """(grad_x, grad_A (n, r_max, K), grad_B (n, N, r_max)), each empty when not needed."""
    dt = x.dtype
    n, r_max, K = lora_A.shape
    N = lora_B.shape[1]
    dy2, x2 = flat(dy.to(dt)), flat(x)
    own = _one_hot(row_adapter, n, dt)
    s = torch.tensor(scalings, dtype=dt, device=x.device)[None, :, None]
    A_cat = lora_A.to(dt).reshape(n * r_max, K)
    B_cat = lora_B.to(dt).permute(1, 0, 2).reshape(N, n * r_max)
    grad_x, grad_a, grad_b = not_computed(x), not_computed(lora_A), not_computed(lora_B)
    if need_x or need_lora_a:
        # s_a·dy·B_a in row m's own columns, zero in the others.
        dyb_wide = ((dy2 @ B_cat).view(-1, n, r_max) * own * s).reshape(-1, n * r_max)
        keep = torch_multi_keep(x2, seed, row_adapter, dropout_ps)  # regenerated from the forward's seed
        if need_x:
            lora_dx = dyb_wide @ A_cat
            if keep is not None:
                lora_dx = lora_dx * keep
            grad_x = (dy2 @ weight.to(dt) + lora_dx).reshape(x.shape)
        if need_lora_a:
            xd = x2 if keep is None else x2 * keep
            grad_a = (dyb_wide.t() @ xd).view(n, r_max, K).to(lora_A.dtype)
    if need_lora_b:
        xa_wide = (own * s * xa[:, None, :]).reshape(-1, n * r_max)
        grad_b = (dy2.t() @ xa_wide).view(N, n, r_max).permute(1, 0, 2).to(lora_B.dtype)
    return grad_x, grad_a, grad_b


torch_multi_lora_bwd.register_fake(fake_multi_bwd)


class TorchMultiLoraLinear(MultiLoraLinearFunction):
    """Torch backend, several adapters in one batch: plain PyTorch, any device and float dtype."""

    fwd_op = torch.ops.lora_kernels.torch_multi_lora_fwd
    bwd_op = torch.ops.lora_kernels.torch_multi_lora_bwd
