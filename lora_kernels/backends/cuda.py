"""The CUDA backend (experimental): cuBLAS (through torch) for the big GEMMs, lora_kernels._cuda for dropout.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

Forward:  xa = _cuda.dropout_shrink(x, A, seed, p)             (M, r) float32, mask made in-kernel
          y  = addmm(b, x, Wᵀ);  y += (s·xa → x.dtype)·Bᵀ       two cuBLAS calls
Backward: dyB    = dy·B                                         cuBLAS, float32 output
          grad_B = s·dyᵀ·xa                                     cuBLAS
          grad_x = dy·W (cuBLAS), then _cuda.lora_dx_epilogue adds s·(dyB·A)⊙mask/(1-p) in place
          grad_A = _cuda.dropout_grad_a(dyB, x, seed, p, s)     regenerates the same mask

The mask is bit-identical to the Triton backend's (csrc/philox.cuh reproduces Triton's Philox), so for
one seed both backends drop the same elements. Experimental: it runs only when asked for
(LORA_KERNELS_BACKEND=cuda) and has not yet run on a GPU. The extension is optional (built by setup.py
only with a CUDA torch and nvcc); it is imported lazily and a missing build raises a RuntimeError.
"""
from typing import Optional, Tuple

import torch

from .base import (KERNEL_DTYPES, LoraLinearFunction, draw_seed, fake_bwd, fake_fwd_flat_xa, no_seed,
                   not_computed)


def _load_extension():
    try:
        from .. import _cuda  # type: ignore[attr-defined]
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


@torch.library.custom_op("lora_kernels::cuda_lora_fwd", mutates_args=())
def cuda_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scaling: float, dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(y, xa = dropout(x)·Aᵀ as (M, r) float32, seed)."""
    ext = _load_extension()
    dt = x.dtype
    N, r = weight.shape[0], lora_A.shape[0]
    x2 = _rows(x)
    seed = draw_seed(x.device) if dropout_p > 0.0 else no_seed(x.device)
    if x2.shape[0] == 0:
        xa = torch.zeros((0, r), dtype=torch.float32, device=x.device)
        y2 = torch.empty((0, N), dtype=dt, device=x.device)
    else:
        xa = ext.dropout_shrink(x2, _lora_a(lora_A, dt), seed, float(dropout_p))
        y2 = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        # LoRA expand in the activation dtype (as PEFT's lora_B runs and the Triton kernel does).
        y2.addmm_((xa * scaling).to(dt), lora_B.to(dt).t())
    return y2.view(*x.shape[:-1], N), xa, seed


cuda_lora_fwd.register_fake(fake_fwd_flat_xa)


@torch.library.custom_op("lora_kernels::cuda_lora_bwd", mutates_args=())
def cuda_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor,
                  lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float, need_x: bool,
                  need_lora_a: bool, need_lora_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B), each empty when not needed."""
    s, p, dt = scaling, dropout_p, x.dtype
    grad_x, grad_a, grad_b = not_computed(x), not_computed(lora_A), not_computed(lora_B)
    x2 = _rows(x)
    dy2 = dy.to(dt).reshape(-1, weight.shape[0])
    if x2.shape[0] == 0:
        return (torch.zeros_like(x) if need_x else grad_x, torch.zeros_like(lora_A) if need_lora_a else grad_a,
                torch.zeros_like(lora_B) if need_lora_b else grad_b)
    ext = _load_extension()
    if need_x or need_lora_a:
        dyb = _mm_f32(dy2, lora_B.to(dt))  # (M, r) float32
    if need_lora_b:
        grad_b = _mm_f32(dy2.t(), (xa * s).to(dt)).to(lora_B.dtype)
    if need_x:
        gx = torch.mm(dy2, weight.to(dt))  # (M, K), fresh and contiguous: the epilogue adds into it
        ext.lora_dx_epilogue(gx, dyb, _lora_a(lora_A, dt), seed, float(p), float(s))
        grad_x = gx.view(x.shape)
    if need_lora_a:
        grad_a = ext.dropout_grad_a(dyb, x2, seed, float(p), float(s)).to(lora_A.dtype)
    return grad_x, grad_a, grad_b


cuda_lora_bwd.register_fake(fake_bwd)


class CudaLoraLinear(LoraLinearFunction):
    """CUDA backend (lora_kernels._cuda + cuBLAS), experimental: explicit LORA_KERNELS_BACKEND=cuda only."""

    fwd_op = torch.ops.lora_kernels.cuda_lora_fwd
    bwd_op = torch.ops.lora_kernels.cuda_lora_bwd


def unavailable_reason(x: torch.Tensor) -> Optional[Exception]:
    """Why the CUDA backend cannot compute x (the error an explicit request raises), or None when it can."""
    try:
        _load_extension()
    except RuntimeError as err:
        return err
    if not x.is_cuda:
        return RuntimeError(f"LORA_KERNELS_BACKEND=cuda needs CUDA tensors, got device {x.device}")
    if x.dtype not in KERNEL_DTYPES:
        return ValueError(f"x has dtype {x.dtype}: the CUDA backend supports float16, bfloat16 and float32 "
                          "(use LORA_KERNELS_BACKEND=torch for float64)")
    return None
