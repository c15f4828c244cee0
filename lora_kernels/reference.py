"""The plain-PyTorch LoRA math: the CPU backend and the oracle of the tests.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

`lora_linear_reference` is the formula written out, for tests (run it in float64).
`TorchLoraLinear` is the torch backend: an autograd Function with the same memory contract as
the Triton one — it saves x and x·Aᵀ and a seed, never the mask or a dropped copy of x; the mask
is regenerated in backward from a torch.Generator seeded with the forward's seed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Seeds are drawn in [0, SEED_BOUND) from torch's generator of x's device.
SEED_BOUND = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """One int64 seed from the default generator of `device`, left on that device (no host sync)."""
    return torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)


def torch_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The torch backend's dropout mask: a pure function of (seed, shape, device type)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, keep_mask: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0):
    """The formula, in the dtype of its inputs (tests pass float64 copies).

    keep_mask: bool tensor of x's shape, True where x is kept; None means no dropout.
    """
    dropped = x if keep_mask is None else x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_A), lora_B)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class TorchLoraLinear(torch.autograd.Function):
    """Torch backend. Inputs must already be validated and cast by functional.fused_lora_linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float):
        dt = x.dtype
        A = lora_A.to(dt)
        B = lora_B.to(dt)
        seed = None
        if dropout_p > 0.0:
            seed = int(draw_seed(x.device).item())
            keep = torch_keep_mask(seed, x.shape, dropout_p, x.device)
            xa = F.linear(x * keep.to(dt), A) * (1.0 / (1.0 - dropout_p))
            del keep
        else:
            xa = F.linear(x, A)
        y = F.linear(x, weight, bias) + scaling * F.linear(xa, B)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        dt = x.dtype
        need_x, need_w, need_b, need_a, need_bl = ctx.needs_input_grad[:5]
        with torch.autocast(x.device.type, enabled=False):
            dy = dy.to(dt)
            A = lora_A.to(dt)
            B = lora_B.to(dt)
            dy2, x2, xa2 = _flat(dy), _flat(x), _flat(xa)
            keep = None
            if p > 0.0 and (need_x or need_a):
                keep = _flat(torch_keep_mask(ctx.seed, x.shape, p, x.device)).to(dt) * (1.0 / (1.0 - p))
            dyb = dy2 @ B if (need_x or need_a) else None
            grad_x = grad_w = grad_b = grad_a = grad_bl = None
            if need_x:
                lora_dx = (dyb @ A) * s
                if keep is not None:
                    lora_dx = lora_dx * keep
                grad_x = (dy2 @ weight.to(dt) + lora_dx).reshape(x.shape)
            if need_w:
                grad_w = (dy2.t() @ x2).to(weight.dtype)
            if need_b and ctx.bias_dtype is not None:
                grad_b = dy2.sum(0).to(ctx.bias_dtype)
            if need_a:
                xd = x2 if keep is None else x2 * keep
                grad_a = ((dyb.t() @ xd) * s).to(lora_A.dtype)
            if need_bl:
                grad_bl = ((dy2.t() @ xa2) * s).to(lora_B.dtype)
        return grad_x, grad_w, grad_b, grad_a, grad_bl, None, None
