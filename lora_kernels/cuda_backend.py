"""The hybrid CUDA backend: cuBLAS (through torch) for the big GEMMs, lora_kernels._cuda for dropout.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

Forward:  xa = _cuda.dropout_shrink(x, A, seed, p)             (M, r) float32, mask made in-kernel
          y  = addmm(b, x, Wᵀ);  y += (s·xa → x.dtype)·Bᵀ       two cuBLAS calls
Backward: dyB    = dy·B                                         cuBLAS, float32 output
          grad_B = s·dyᵀ·xa                                     cuBLAS
          grad_x = dy·W (cuBLAS), then _cuda.lora_dx_epilogue adds s·(dyB·A)⊙mask/(1-p) in place
          grad_A = _cuda.dropout_grad_a(dyB, x, seed, p, s)     regenerates the same mask
          grad_W, grad_b (only if asked for) = dyᵀ·x, Σ dy

The mask is bit-identical to the Triton backend's (csrc/philox.cuh reproduces Triton's Philox), so for
one seed both backends drop the same elements. Like every backend, CudaLoraLinear saves x, xa (r
columns) and the seed for backward — never a mask, a dropped copy or a cast copy of x.

The extension is optional (built by setup.py only with a CUDA torch and nvcc); it is imported lazily
and a missing build raises a RuntimeError that says so.
"""
from __future__ import annotations

import torch

from .reference import base_grads, draw_seed

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _load_extension():
    try:
        from . import _cuda  # type: ignore[attr-defined]
    except ImportError as err:
        raise RuntimeError(
            "the lora_kernels CUDA backend needs the compiled extension lora_kernels._cuda, which is not built "
            f"or cannot be loaded ({err}). It is built by `pip install .` when torch has CUDA and nvcc is on PATH (or with "
            "LORA_KERNELS_BUILD_CUDA=1); otherwise use LORA_KERNELS_BACKEND=triton or torch"
        ) from err
    return _cuda


def cuda_extension():
    """The compiled lora_kernels._cuda module; RuntimeError with the reason if it is not built."""
    return _load_extension()


def extension_available() -> bool:
    """True when lora_kernels._cuda is built and importable."""
    try:
        _load_extension()
    except RuntimeError:
        return False
    return True


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as an (M, C) matrix of rows with unit column stride: a view when possible (else reshape copies)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _lora_a(lora_A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """lora_A as the kernels take it: float32 or the activation dtype (lora_A is small)."""
    return lora_A if lora_A.dtype in (torch.float32, dtype) else lora_A.to(torch.float32)


_MM_OUT_DTYPE_OK = {}  # device type -> whether torch.mm(..., out_dtype=torch.float32) works for half inputs


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output; half-precision inputs are multiplied by cuBLAS with float32 accumulation
    and, where torch supports out_dtype, no rounding of the result to half precision."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    ok = _MM_OUT_DTYPE_OK.get(a.device.type)
    if ok is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            if ok:
                raise
            _MM_OUT_DTYPE_OK[a.device.type] = False
        else:
            _MM_OUT_DTYPE_OK[a.device.type] = True
            return out
    return torch.mm(a, b).float()


class CudaLoraLinear(torch.autograd.Function):
    """CUDA backend (lora_kernels._cuda + cuBLAS). Same signature and contract as TritonLoraLinear:
    inputs already validated and cast by functional.fused_lora_linear; x, weight, bias in one dtype
    (float16/bfloat16/float32); lora_A, lora_B in any float dtype; dropout_p == 0 means no dropout."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float):
        ext = _load_extension()
        dt = x.dtype
        if dt not in _KERNEL_DTYPES:
            raise ValueError(f"x has dtype {dt}: the CUDA backend supports float16, bfloat16 and float32 "
                             "(use LORA_KERNELS_BACKEND=torch for float64)")
        N = weight.shape[0]
        r = lora_A.shape[0]
        x2 = _rows(x)
        seed = draw_seed(x.device) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64, device=x.device)
        if x2.shape[0] == 0:
            xa = torch.zeros((0, r), dtype=torch.float32, device=x.device)
            y2 = torch.empty((0, N), dtype=dt, device=x.device)
        else:
            xa = ext.dropout_shrink(x2, _lora_a(lora_A, dt), seed, float(dropout_p))
            y2 = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
            # LoRA expand in the activation dtype (as PEFT's lora_B runs and the Triton kernel does).
            y2.addmm_((xa * scaling).to(dt), lora_B.to(dt).t())
        ctx.save_for_backward(x, xa, seed, weight, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x, xa, seed, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bl = ctx.needs_input_grad[:5]
        s, p = ctx.scaling, ctx.dropout_p
        dt = x.dtype
        N = weight.shape[0]
        with torch.autocast(x.device.type, enabled=False):  # backward may run under autocast
            x2 = _rows(x)
            dy2 = dy.to(dt).reshape(-1, N)
            grad_x = grad_w = grad_bias = grad_a = grad_bl = None
            if x2.shape[0] == 0:
                grad_x = torch.zeros_like(x) if need_x else None
                grad_a = torch.zeros_like(lora_A) if need_a else None
                grad_bl = torch.zeros_like(lora_B) if need_bl else None
            else:
                ext = _load_extension()
                if need_x or need_a:
                    dyb = _mm_f32(dy2, lora_B.to(dt))  # (M, r) float32
                if need_bl:
                    grad_bl = _mm_f32(dy2.t(), (xa * s).to(dt)).to(lora_B.dtype)
                if need_x:
                    gx = torch.mm(dy2, weight.to(dt))  # (M, K), fresh and contiguous: the epilogue adds into it
                    ext.lora_dx_epilogue(gx, dyb, _lora_a(lora_A, dt), seed, float(p), float(s))
                    grad_x = gx.view(x.shape)
                if need_a:
                    grad_a = ext.dropout_grad_a(dyb, x2, seed, float(p), float(s)).to(lora_A.dtype)
            grad_w, grad_bias = base_grads(dy2, x2, need_w, need_b, weight.dtype, ctx.bias_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_bl, None, None
