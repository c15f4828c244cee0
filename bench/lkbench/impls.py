"""The implementations measured side by side, all built on the same weights.

    base        the bare frozen base linear, F.linear(x, W): forward x·Wᵀ, backward dy·W only. The floor.
    fused       ours, FusedLoraLinear on the Triton backend as users get it: LORA_KERNELS_GEMM=auto picks,
                per shape and pass, the faster of the two GEMM paths below by measuring both on first use
    fused_gemm  ours with LORA_KERNELS_GEMM=fused: the base GEMM inside our Triton kernels
    split_gemm  ours with LORA_KERNELS_GEMM=split: cuBLAS's base GEMM, then our kernel adds the LoRA term
                (and bias) in place; the dropout mask is regenerated in registers as on the fused path
    ours_torch  ours, FusedLoraLinear on the torch backend (reference.py)
    ours_cuda   ours on the CUDA extension backend, measured only where lora_kernels accepts it
    hybrid      BENCH-ONLY variant, not a lora_kernels path: our Triton shrink pass for
                xa = dropout(x)·Aᵀ, then cuBLAS computes the LoRA term s·xa·Bᵀ and adds the base GEMM
                with it as the C operand (torch.addmm); backward: our Triton dy·B/grad_B and grad_A
                passes, cuBLAS dy·W with the LoRA dx term as C (at p > 0 the mask is materialised)
    peft        PEFT's LoRA Linear (peft.tuners.lora.Linear) from get_peft_model
    torch       a plain unfused PyTorch LoRA, as a user would write it: F.dropout, two F.linear, add

fused_gemm, split_gemm and hybrid answer the question "does a cuBLAS base GEMM plus a separate LoRA
pass beat one fused Triton GEMM?" for each shape; `fused` shows what the automatic choice makes of it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._internals import dot_precision, linear_sharing
from .cases import Case

IMPLS = ("base", "fused", "fused_gemm", "split_gemm", "ours_torch", "ours_cuda", "hybrid", "peft", "torch")
LABELS = {
    "base": "bare base linear (x·Wᵀ, dy·W)",
    "fused": "ours, Triton backend, GEMM path chosen per shape",
    "fused_gemm": "ours, Triton backend, Triton base GEMM",
    "split_gemm": "ours, Triton backend, cuBLAS base GEMM + in-place LoRA pass",
    "ours_torch": "ours, torch backend",
    "ours_cuda": "ours, CUDA extension backend",
    "hybrid": "bench-only hybrid: Triton shrink + cuBLAS addmm (LoRA term as C)",
    "peft": "PEFT LoRA Linear",
    "torch": "plain unfused PyTorch LoRA",
}
# The environment each of our implementations runs under (lora_kernels reads it at every call).
OUR_ENV = {
    "fused": {"LORA_KERNELS_BACKEND": "triton"},
    "fused_gemm": {"LORA_KERNELS_BACKEND": "triton", "LORA_KERNELS_GEMM": "fused"},
    "split_gemm": {"LORA_KERNELS_BACKEND": "triton", "LORA_KERNELS_GEMM": "split"},
    "ours_torch": {"LORA_KERNELS_BACKEND": "torch"},
    "ours_cuda": {"LORA_KERNELS_BACKEND": "cuda"},
}


class Skip(Exception):
    """An implementation that cannot run on this machine; the message says why."""


@contextlib.contextmanager
def lora_env(env: Optional[Dict[str, str]]):
    """Run with these environment variables set (None or {} leaves the environment alone)."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Tensors:
    """The shared operands of one case: every implementation computes with these exact values."""
    x: torch.Tensor    # (M, K), activation dtype
    dy: torch.Tensor   # (M, N), activation dtype
    W: torch.Tensor    # (N, K), activation dtype, frozen
    A: torch.Tensor    # (r, K), adapter dtype
    B: torch.Tensor    # (N, r), adapter dtype; non-zero so the LoRA term is not trivially zero


def make_tensors(case: Case, device, seed: int = 0) -> Tensors:
    torch.manual_seed(seed)
    dt, at = case.torch_dtype(), case.torch_adapter_dtype()
    # Scaled so activations stay O(1) through the GEMMs in half precision.
    x = torch.randn(case.M, case.K, device=device, dtype=dt)
    dy = torch.randn(case.M, case.N, device=device, dtype=dt)
    W = (torch.randn(case.N, case.K, device=device) / case.K ** 0.5).to(dt)
    A = (torch.randn(case.r, case.K, device=device) / case.K ** 0.5).to(at)
    B = (torch.randn(case.N, case.r, device=device) / case.r ** 0.5).to(at)
    return Tensors(x, dy, W, A, B)


@dataclass
class Built:
    """A ready implementation: call it on x; grad_inputs lists what backward differentiates."""
    name: str
    module: nn.Module
    env: Optional[Dict[str, str]] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with lora_env(self.env):
            return self.module(x)

    def params(self) -> List[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def grad_inputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        # x needs its gradient as in any layer that is not the first: dx = dy·W (+ the LoRA term).
        return [x] + self.params()


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class BaseLinear(nn.Module):
    def __init__(self, W):
        super().__init__()
        self.weight = _frozen(W)

    def forward(self, x):
        return F.linear(x, self.weight)


class _LoraOnTensors(nn.Module):
    """The frozen W and trainable copies of A and B of a case, for the bench-only LoRA modules below."""

    def __init__(self, case: Case, t: Tensors):
        super().__init__()
        self.weight = _frozen(t.W)
        self.lora_A = nn.Parameter(t.A.clone())
        self.lora_B = nn.Parameter(t.B.clone())
        self.p, self.scaling = case.dropout, case.lora_alpha / case.r


class UnfusedTorchLora(_LoraOnTensors):
    """The textbook LoRA in the activation dtype; autograd keeps what it keeps (the dropped copy too)."""

    def forward(self, x):
        dt = x.dtype
        lora = F.linear(F.linear(F.dropout(x, self.p, self.training), self.lora_A.to(dt)), self.lora_B.to(dt))
        return F.linear(x, self.weight) + self.scaling * lora


class _HybridLora(torch.autograd.Function):
    """BENCH-ONLY: our Triton LoRA passes around cuBLAS base GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, W, A, B, scaling: float, p: float):
        from lora_kernels.ops.layout import rows_of
        from lora_kernels.ops.lora_shrink import lora_shrink
        from ._internals import draw_seed

        dt = x.dtype
        seed = draw_seed(x.device) if p > 0 else torch.zeros(1, dtype=torch.int64, device=x.device)
        xa = lora_shrink(x, rows_of(x), A, seed, p, dot_precision(dt))          # (M, r) float32
        xa_s = (xa * scaling).to(dt)
        y = torch.addmm(xa_s @ B.to(dt).t(), x, W.t())                           # LoRA term as C
        ctx.save_for_backward(x, xa, seed, W, A, B)
        ctx.scaling, ctx.p = scaling, p
        return y

    @staticmethod
    def backward(ctx, dy):
        from lora_kernels.ops.dropout import dropout_mask
        from lora_kernels.ops.layout import rows_of
        from lora_kernels.ops.lora_dy_b import lora_dy_b
        from lora_kernels.ops.lora_linear_bwd_dx import lora_linear_bwd_dx

        x, xa, seed, W, A, B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        dt = x.dtype
        precision = dot_precision(dt)
        dy = dy.contiguous()
        dyb, grad_b = lora_dy_b(dy, rows_of(dy), B, xa, s, compute_dyb=True, compute_grad_b=True,
                                dot_precision=precision)
        _, grad_a = lora_linear_bwd_dx(dy, rows_of(dy), W, dyb, A, x, rows_of(x), seed, s, p,
                                       compute_dx=False, compute_grad_a=True, dot_precision=precision)
        lora_dx = (dyb * s).to(dt) @ A.to(dt)                                      # (M, K)
        if p > 0:
            lora_dx.mul_(dropout_mask(seed, x.shape[0], x.shape[1], p)).mul_(1.0 / (1.0 - p))
        grad_x = torch.addmm(lora_dx, dy, W)
        return grad_x, None, grad_a.to(A.dtype), grad_b.to(B.dtype), None, None


class HybridLora(_LoraOnTensors):
    def forward(self, x):
        p = self.p if self.training else 0.0
        return _HybridLora.apply(x, self.weight, self.lora_A, self.lora_B, self.scaling, p)


def _ours(case: Case, t: Tensors, name: str) -> Built:
    import lora_kernels as lk

    env = OUR_ENV[name]
    with lora_env(env):
        try:
            lk.resolve_backend(t.x)
        except (RuntimeError, ValueError) as err:
            raise Skip(str(err)) from err
    layer = lk.FusedLoraLinear.from_linear(linear_sharing(t.W, None), r=case.r, lora_alpha=case.lora_alpha,
                                           lora_dropout=case.dropout, lora_dtype=case.torch_adapter_dtype())
    with torch.no_grad():
        layer.lora_A.copy_(t.A)
        layer.lora_B.copy_(t.B)
    return Built(name, layer, env)


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _peft(case: Case, t: Tensors) -> Built:
    import peft

    cfg = peft.LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.dropout,
                          target_modules=["proj"], bias="none")
    # autocast_adapter_dtype=True is PEFT's default: fp32 adapters on a half-precision base.
    model = peft.get_peft_model(_Holder(linear_sharing(t.W, None)), cfg,
                                autocast_adapter_dtype=case.adapter_dtype == "fp32")
    layer = model.base_model.model.proj  # the LoRA Linear itself: no PeftModel wrapper overhead in the timing
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if A.dtype != t.A.dtype:
        raise RuntimeError(f"PEFT built {A.dtype} adapters, the case asks for {t.A.dtype}")
    with torch.no_grad():
        A.copy_(t.A)
        B.copy_(t.B)
    return Built("peft", layer)


def build(name: str, case: Case, t: Tensors) -> Built:
    """Implementation `name` on the tensors of `case`, in training mode; raises Skip if it cannot run here."""
    if name == "base":
        built = Built(name, BaseLinear(t.W))
    elif name in OUR_ENV:
        built = _ours(case, t, name)
    elif name == "hybrid":
        built = Built(name, HybridLora(case, t))
    elif name == "peft":
        built = _peft(case, t)
    elif name == "torch":
        built = Built(name, UnfusedTorchLora(case, t))
    else:
        raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")
    built.module.train()
    return built


def reference_output(case: Case, t: Tensors) -> torch.Tensor:
    """y without dropout in float32, the yardstick for every LoRA implementation's output."""
    from ._internals import lora_linear_reference

    f = lambda u: u.float()  # noqa: E731
    return lora_linear_reference(f(t.x), f(t.W), None, f(t.A), f(t.B), case.lora_alpha / case.r)


# Relative Frobenius error allowed against the float32 reference; half precision rounds y itself.
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 3e-2}


def output_error(built: Built, x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ with dropout off (eval mode), so every LoRA implementation must agree."""
    built.module.eval()
    try:
        with torch.no_grad():
            y = built(x).float()
    finally:
        built.module.train()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def names_from(spec: Optional[str]) -> List[str]:
    """'a,b,c' -> validated implementation names (None or 'all' -> every one)."""
    if not spec or spec == "all":
        return list(IMPLS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(IMPLS)}")
    return names


__all__ = ["IMPLS", "LABELS", "Skip", "Tensors", "Built", "make_tensors", "build", "reference_output",
           "output_error", "TOLERANCE", "names_from", "lora_env"]
