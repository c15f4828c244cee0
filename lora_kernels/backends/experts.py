"""LoRA on MoE experts in plain PyTorch: one projection over the token–expert pairs, grouped by expert.

    y_e = x_e·W_eᵀ (+ b_e) + s · (dropout_p(x_e)·A_eᵀ)·B_eᵀ      for the rows x_e routed to expert e

The adapter tensors keep PEFT's target_parameters layout: lora_A is (r·E, in), expert e's A_e its rows
e·r … e·r+r-1; lora_B is (out, r·E), B_e its columns e, E+e, 2E+e, … (lora_B viewed (out, r, E)). Both are
read as views: no per-expert copy and no E × out × in ΔW, ever. The rows come sorted by expert (ExpertRouting,
built once per forward and shared by every projection of the experts module), so expert e's rows are one slice;
an expert without rows is skipped.

Same memory contract as the dense backends: the Function saves the routed input, the (S, r) shrink and a seed;
the dropout keep-mask (one independent mask per token–expert pair: the sorted rows are the pairs) is drawn from
torch's generator (torch_keep_mask) and drawn again in backward. This is the torch path: one matmul pair per
expert that has rows, so the launch count grows with the experts hit. Where the dense layers run Triton,
functional.fused_grouped_lora_linear takes the grouped kernels instead (triton_experts.py), unless the base
weight or bias requires grad.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .base import draw_seed, no_seed
from .torch import torch_keep_mask


@dataclass(frozen=True)
class ExpertRouting:
    """The token–expert pairs of one forward sorted by expert: built once, shared by every projection.

    order: (S,) index of each sorted pair into the flattened (tokens, top_k) routing; token: (S,) its token;
    counts: rows per expert (host ints; one host sync per forward). Pairs routed to no local expert (an expert
    id outside [0, E), expert parallelism's sentinel) sort to the tail past sum(counts) and get zero output.
    """
    order: torch.Tensor
    token: torch.Tensor
    counts: Tuple[int, ...]
    # The Triton path's tile table per device (ops/expert_tiles.py): built on first use, shared by both projections
    # and their backward.
    _tiles: Dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_top_k(cls, top_k_index: torch.Tensor, num_experts: int) -> "ExpertRouting":
        top_k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1).long()
        # A sentinel (out of range) sorts after every real expert.
        ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, num_experts))
        sorted_ids, order = torch.sort(ids, stable=True)
        counts = torch.bincount(sorted_ids, minlength=num_experts + 1)[:num_experts]
        return cls(order=order, token=order // top_k, counts=tuple(int(c) for c in counts.tolist()))

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    def tiles(self, device):
        """The tile table of the grouped Triton kernels for these rows (ops/expert_tiles.py), built once."""
        from ..ops.expert_tiles import expert_tiles, tile_block_m

        key = str(device)
        if key not in self._tiles:
            self._tiles[key] = expert_tiles(self.counts, tile_block_m(self.counts), device)
        return self._tiles[key]

    def slices(self):
        """(expert, row slice) for every expert that has rows."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, slice(start, start + n)
            start += n


def expert_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int):
    """(A, B) as (E, r, in) and (out, r, E) views of PEFT's (r·E, in) / (out, r·E) tensors."""
    r = lora_A.shape[0] // num_experts
    return lora_A.view(num_experts, r, lora_A.shape[1]), lora_B.view(lora_B.shape[0], r, num_experts)


class GroupedLoraFunction(torch.autograd.Function):
    """One expert projection with LoRA over sorted rows. weight: (E, out, in), or (E, in, out) with transposed;
    bias: (E, out) or None; lora_A / lora_B: PEFT's layout (or both None: the base projection alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, routing: ExpertRouting, scaling: float, dropout_p: float,
                transposed: bool):
        E, dt = routing.num_experts, x.dtype
        out_features = weight.shape[2] if transposed else weight.shape[1]
        y = x.new_zeros((x.shape[0], out_features))
        has_lora = lora_A is not None
        xa = seed = keep = None
        if has_lora:
            A, B = expert_factors(lora_A, lora_B, E)
            xa = x.new_zeros((x.shape[0], A.shape[1]))
            seed = draw_seed(x.device) if dropout_p > 0.0 else no_seed(x.device)
            if dropout_p > 0.0:
                keep = torch_keep_mask(int(seed.item()), x.shape, dropout_p, x.device)
        for e, rows in routing.slices():
            xe = x[rows]
            w = weight[e].to(dt)
            ye = xe @ w if transposed else xe @ w.t()
            if bias is not None:
                ye = ye + bias[e].to(dt)
            if has_lora:
                xd = xe if keep is None else xe * keep[rows].to(dt) * (1.0 / (1.0 - dropout_p))
                xa[rows] = xd @ A[e].to(dt).t()
                ye = ye + scaling * (xa[rows] @ B[:, :, e].to(dt).t())
            y[rows] = ye
        ctx.save_for_backward(x, xa, seed, weight, bias, lora_A, lora_B)
        ctx.routing, ctx.scaling, ctx.dropout_p, ctx.transposed = routing, scaling, dropout_p, transposed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, seed, weight, bias, lora_A, lora_B = ctx.saved_tensors
        routing, s, p, transposed = ctx.routing, ctx.scaling, ctx.dropout_p, ctx.transposed
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        E, dt = routing.num_experts, x.dtype
        dy = dy.to(dt)
        has_lora = lora_A is not None
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_bias = torch.zeros_like(bias) if need_b else None
        grad_a = grad_b = keep = None
        if has_lora:
            A, B = expert_factors(lora_A, lora_B, E)
            # Zero rows for experts without tokens; the (E, r, in) / (out, r, E) views are PEFT's flat layout.
            grad_a = torch.zeros_like(A) if need_a else None
            grad_b = torch.zeros_like(B) if need_bb else None
            if p > 0.0 and (need_x or need_a):
                keep = torch_keep_mask(int(seed.item()), x.shape, p, x.device)
        for e, rows in routing.slices():
            dye, xe = dy[rows], x[rows]
            w = weight[e].to(dt)
            if need_x:
                grad_x[rows] = dye @ w.t() if transposed else dye @ w
            if need_w:
                gw = dye.t() @ xe
                grad_w[e] = (gw.t() if transposed else gw).to(weight.dtype)
            if need_b:
                grad_bias[e] = dye.sum(0).to(bias.dtype)
            if not has_lora:
                continue
            scale = None if keep is None else keep[rows].to(dt) * (1.0 / (1.0 - p))
            if need_x or need_a:
                dyb = dye @ B[:, :, e].to(dt)
                if need_x:
                    lora_dx = (dyb @ A[e].to(dt)) * s
                    grad_x[rows] += lora_dx if scale is None else lora_dx * scale
                if need_a:
                    xd = xe if scale is None else xe * scale
                    grad_a[e] = ((dyb.t() @ xd) * s).to(lora_A.dtype)
            if need_bb:
                grad_b[:, :, e] = ((dye.t() @ xa[rows]) * s).to(lora_B.dtype)
        if grad_a is not None:
            grad_a = grad_a.view_as(lora_A)
        if grad_b is not None:
            grad_b = grad_b.view_as(lora_B)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def grouped_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], routing: ExpertRouting,
                        scaling: float, dropout_p: float, transposed: bool = False) -> torch.Tensor:
    return GroupedLoraFunction.apply(x, weight, bias, lora_A, lora_B, routing, scaling, dropout_p, transposed)
