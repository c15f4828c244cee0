"""The Triton backend: two fused kernel launches forward, two backward (lora_kernels/ops/).

    forward   xa = dropout(x)·Aᵀ                      ops/lora_shrink.py
              y  = x·Wᵀ + b + s·xa·Bᵀ                 ops/lora_linear_fwd.py
    backward  dyB = dy·B, grad_B = s·dyᵀ·xa            ops/lora_dy_b.py
              grad_x = dy·W + s·(dyB·A)⊙mask/(1-p),    ops/lora_linear_bwd_dx.py
              grad_A = s·dyBᵀ·dropout(x)

The base GEMM of each GEMM-shaped pass runs either inside the fused kernel or in torch's matmul with the
LoRA term added by the same kernel in place, chosen per shape (gemm_dispatch.py). Triton is imported on
first use, not with the package: it picks its interpreter (TRITON_INTERPRET=1) when it is first imported.

QLoRA (triton_qlora_fwd / _bwd): the same passes with a 4-bit base; the two GEMM passes dequantize W tile by
tile in registers (fused) or into a one-off buffer for torch's matmul (split), chosen per shape as for dense W.
"""
import warnings
from typing import List, Optional, Tuple

import torch

from ..settings import interpreting
from .base import (KERNEL_DTYPES, LoraLinearFunction, MultiLoraLinearFunction, QLoraLinearFunction, draw_seed,
                   fake_bwd, fake_fwd_flat_xa, fake_multi_bwd, fake_multi_fwd, no_seed, not_computed, on_device_of,
                   qlora_ops)
from .gemm_dispatch import choose as choose_gemm
from .gemm_dispatch import gemm_key


def triton_import_error() -> Optional[ImportError]:
    """None if triton imports, else the ImportError."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the machine
        return err
    return None


def unavailable_reason(x: torch.Tensor) -> Optional[Exception]:
    """Why the Triton kernels cannot compute x (the error an explicit request raises), or None when they can."""
    err = triton_import_error()
    if err is not None:
        return RuntimeError(f"LORA_KERNELS_BACKEND=triton but triton cannot be imported: {err}")
    if not (x.is_cuda or interpreting()):
        return RuntimeError(f"LORA_KERNELS_BACKEND=triton needs CUDA tensors (got device {x.device}) "
                            "or TRITON_INTERPRET=1 to run the kernels on CPU")
    if x.dtype not in KERNEL_DTYPES:
        return ValueError(f"x has dtype {x.dtype}: the Triton backend supports float16, bfloat16 and float32 "
                          "(use LORA_KERNELS_BACKEND=torch for float64)")
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # Triton's interpreter multiplies raw bit patterns for bfloat16 tl.dot: the results are garbage, not
        # rounding error (relative error ~1e9), and nothing warns.
        return ValueError("x is bfloat16 on CPU: Triton's interpreter (TRITON_INTERPRET=1) computes bfloat16 "
                          "tl.dot wrongly; use LORA_KERNELS_BACKEND=torch (or auto) for bfloat16 on CPU")
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """Follow torch's own TF32 switch for float32 matmuls, so fp32 results match nn.Linear's (half precision
    inputs ignore it)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if fp32_matmul_uses_tf32() else "ieee"


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch runs float32 matmuls in TF32 on CUDA. torch >= 2.9 says it in
    torch.backends.cuda.matmul.fp32_precision ("tf32" | "ieee", resolved through torch.backends.fp32_precision;
    "none" while neither API has set anything); reading the legacy allow_tf32 after the new API was used raises,
    so it is read only where nothing newer says."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


_warned_copy = False


def _rows_or_copy(t: torch.Tensor):
    """The kernels' row layout of t; a layout they cannot address is copied once, with a warning."""
    from ..ops.layout import rows_of

    rows = rows_of(t)
    if rows is None:
        global _warned_copy
        if not _warned_copy:
            warnings.warn(f"lora_kernels: a tensor of shape {tuple(t.shape)} and strides {t.stride()} has leading "
                          "dims that cannot be addressed as rows without a copy; copying it", stacklevel=3)
            _warned_copy = True
        t = t.contiguous()
        rows = rows_of(t)
    return t, rows


@torch.library.custom_op("lora_kernels::triton_lora_fwd", mutates_args=())
def triton_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """(y, xa = dropout(x)·Aᵀ as (M, r) float32, seed): forward passes 1 and 2."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


@on_device_of(0)
def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """triton_lora_fwd for a dense weight or a 4-bit QuantizedWeight (the launchers take either)."""
    from ..ops.lora_linear_fwd import lora_linear_fwd
    from ..ops.lora_shrink import lora_shrink
    from ..ops.format_4bit import QuantizedWeight

    x, rows = _rows_or_copy(x)
    precision = dot_precision(x.dtype)
    seed = draw_seed(x.device) if dropout_p > 0.0 else no_seed(x.device)
    if rows.M == 0:
        xa = torch.zeros((0, lora_A.shape[0]), dtype=torch.float32, device=x.device)
        return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device), xa, seed
    xa = lora_shrink(x, rows, lora_A, seed, dropout_p, precision)
    run = lambda gemm: lora_linear_fwd(x, rows, weight, bias, xa, lora_B, scaling, precision, gemm)  # noqa: E731
    key = gemm_key("fwd", x, rows.M, x.shape[-1], weight.shape[0], lora_A.shape[0], bias=bias is not None,
                   w4bit=isinstance(weight, QuantizedWeight))
    return run(choose_gemm(key, x.device, run)), xa, seed


triton_lora_fwd.register_fake(fake_fwd_flat_xa)


@torch.library.custom_op("lora_kernels::triton_lora_bwd", mutates_args=())
def triton_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float, need_x: bool,
                    need_lora_a: bool, need_lora_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B), each empty when not needed: backward passes 1 and 2."""
    return _backward(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b)


@on_device_of(1)
def _backward(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b,
              adapters=None):
    """Backward passes 1 and 2 for a dense weight or a 4-bit QuantizedWeight. With `adapters` (ops/segments.py)
    they run segmented: lora_A / lora_B hold every adapter stacked, scaling and dropout come from the table."""
    from ..ops.format_4bit import QuantizedWeight
    from ..ops.lora_dy_b import lora_dy_b
    from ..ops.lora_linear_bwd_dx import lora_linear_bwd_dx

    grad_x, grad_a, grad_b = not_computed(x), not_computed(lora_A), not_computed(lora_B)
    dy, dy_rows = _rows_or_copy(dy.to(x.dtype))
    if dy_rows.M == 0:
        return (torch.zeros_like(x) if need_x else grad_x, torch.zeros_like(lora_A) if need_lora_a else grad_a,
                torch.zeros_like(lora_B) if need_lora_b else grad_b)
    x, x_rows = _rows_or_copy(x)
    precision = dot_precision(x.dtype)
    dyb, grad_b32 = lora_dy_b(dy, dy_rows, lora_B, xa, scaling, compute_dyb=need_x or need_lora_a,
                              compute_grad_b=need_lora_b, dot_precision=precision, adapters=adapters)
    if need_x or need_lora_a:
        run = lambda gemm: lora_linear_bwd_dx(  # noqa: E731
            dy, dy_rows, weight, dyb, lora_A, x, x_rows, seed, scaling, dropout_p, compute_dx=need_x,
            compute_grad_a=need_lora_a, dot_precision=precision, gemm=gemm, adapters=adapters)
        dropout = adapters.has_dropout if adapters is not None else dropout_p > 0.0
        key = gemm_key("bwd", x, x_rows.M, x.shape[-1], dy.shape[-1], lora_A.shape[-2], dropout=dropout,
                       grad_A=need_lora_a, w4bit=isinstance(weight, QuantizedWeight), segmented=adapters is not None)
        # Without grad_x there is no base GEMM to place.
        dx, grad_a32 = run(choose_gemm(key, x.device, run) if need_x else "fused")
        if need_x:
            grad_x = dx
        if need_lora_a:
            grad_a = grad_a32.to(lora_A.dtype)
    if need_lora_b:
        grad_b = grad_b32.to(lora_B.dtype)
    return grad_x, grad_a, grad_b


triton_lora_bwd.register_fake(fake_bwd)


class TritonLoraLinear(LoraLinearFunction):
    """Triton backend: 2 kernel launches forward, 2 backward (see lora_kernels/ops/)."""

    fwd_op = torch.ops.lora_kernels.triton_lora_fwd
    bwd_op = torch.ops.lora_kernels.triton_lora_bwd


class TritonQLoraLinear(QLoraLinearFunction):
    """Triton backend over a 4-bit base: W dequantized inside the two GEMM passes."""

    qfwd_op, qbwd_op = qlora_ops("triton", _forward, _backward, xa_flat=True)


# Several adapters in one batch (base.py's multi-adapter contract): the same four launches, segmented
# (ops/segments.py): their number does not depend on how many adapters the batch uses, and their row tiles
# walk the rows in row_order (sorted by adapter).

@torch.library.custom_op("lora_kernels::triton_multi_lora_fwd", mutates_args=())
def triton_multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_A: torch.Tensor, lora_B: torch.Tensor, row_adapter: torch.Tensor,
                          row_order: torch.Tensor, ranks: List[int], scalings: List[float],
                          dropout_ps: List[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, xa (M, r_max) float32, seed): forward passes 1 and 2, segmented."""
    return _multi_forward(x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps)


@on_device_of(0)
def _multi_forward(x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps):
    from ..ops.lora_linear_fwd import lora_linear_fwd
    from ..ops.lora_shrink import lora_shrink
    from ..ops.segments import adapter_table

    x, rows = _rows_or_copy(x)
    precision = dot_precision(x.dtype)
    adapters = adapter_table(row_adapter, row_order, ranks, scalings, dropout_ps)
    seed = draw_seed(x.device) if adapters.has_dropout else no_seed(x.device)
    r_max = lora_A.shape[1]
    if rows.M == 0:
        xa = torch.zeros((0, r_max), dtype=torch.float32, device=x.device)
        return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device), xa, seed
    xa = lora_shrink(x, rows, lora_A, seed, 0.0, precision, adapters=adapters)
    run = lambda gemm: lora_linear_fwd(x, rows, weight, bias, xa, lora_B, 1.0, precision, gemm,  # noqa: E731
                                       adapters=adapters)
    key = gemm_key("fwd", x, rows.M, x.shape[-1], weight.shape[0], r_max, bias=bias is not None, segmented=True)
    return run(choose_gemm(key, x.device, run)), xa, seed


triton_multi_lora_fwd.register_fake(fake_multi_fwd(torch.float32))


@torch.library.custom_op("lora_kernels::triton_multi_lora_bwd", mutates_args=())
def triton_multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor,
                          weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, row_adapter: torch.Tensor,
                          row_order: torch.Tensor, ranks: List[int], scalings: List[float], dropout_ps: List[float],
                          need_x: bool, need_lora_a: bool, need_lora_b: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """(grad_x, grad_A (n, r_max, K), grad_B (n, N, r_max)), each empty when not needed: backward passes 1, 2."""
    from ..ops.segments import adapter_table

    adapters = adapter_table(row_adapter, row_order, ranks, scalings, dropout_ps)
    return _backward(dy, x, xa, seed, weight, lora_A, lora_B, 1.0, 0.0, need_x, need_lora_a, need_lora_b, adapters)


triton_multi_lora_bwd.register_fake(fake_multi_bwd)


class TritonMultiLoraLinear(MultiLoraLinearFunction):
    """Triton backend, several adapters in one batch: the same 2 launches forward and 2 backward, segmented."""

    fwd_op = torch.ops.lora_kernels.triton_multi_lora_fwd
    bwd_op = torch.ops.lora_kernels.triton_multi_lora_bwd
