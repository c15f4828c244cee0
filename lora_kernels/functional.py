"""fused_lora_linear: validation, autocast, backend dispatch and the Triton autograd Function.

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

Backends (LORA_KERNELS_BACKEND): auto | triton | torch | cuda. `auto` picks Triton for CUDA tensors
(and on CPU under TRITON_INTERPRET=1) and the torch reference otherwise (and for float64, which the
kernels do not implement); it does not pick `cuda` (the optional csrc/ extension: CUDA dropout kernels
around cuBLAS GEMMs) until GPU measurements show where it wins. An explicitly requested backend that
cannot run raises; nothing falls back silently. Every backend saves x and x·Aᵀ (plus a seed) for
backward, never a dropout mask, a dropped copy or a cast copy of x.

On the Triton backend the base GEMM of each GEMM-shaped pass runs either inside the fused Triton kernel
or in torch's matmul with the LoRA term added by the same kernel in place (LORA_KERNELS_GEMM, chosen per
shape by measurement: gemm_dispatch.py).
"""
import math
import os
import warnings
from typing import Optional, Tuple

import torch

from .gemm_dispatch import choose as choose_gemm
from .gemm_dispatch import gemm_key
from .reference import TorchLoraLinear, draw_seed, lora_function

BACKENDS = ("auto", "triton", "torch", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _triton_import_error():
    """None if triton imports, else the ImportError. Imported on first use, not with the package: Triton picks
    its interpreter (TRITON_INTERPRET=1) when it is first imported, and the torch backend needs no Triton."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the machine
        return err
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    name = os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"LORA_KERNELS_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(x: torch.Tensor) -> str:
    """The backend that will run for input `x`, or a RuntimeError saying why the requested one cannot."""
    name = requested_backend()
    if name == "auto":
        if x.dtype == torch.float64 or _triton_import_error() is not None:
            return "torch"
        return "triton" if (x.is_cuda or _interpreting()) else "torch"
    if name == "triton":
        err = _triton_import_error()
        if err is not None:
            raise RuntimeError(f"LORA_KERNELS_BACKEND=triton but triton cannot be imported: {err}")
        if not (x.is_cuda or _interpreting()):
            raise RuntimeError(f"LORA_KERNELS_BACKEND=triton needs CUDA tensors (got device {x.device}) "
                               "or TRITON_INTERPRET=1 to run the kernels on CPU")
        if x.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"x has dtype {x.dtype}: the Triton backend supports float16, bfloat16 and float32 "
                             "(use LORA_KERNELS_BACKEND=torch for float64)")
        return "triton"
    if name == "cuda":
        from .cuda_backend import cuda_extension

        cuda_extension()  # raises with the reason when the extension is not built
        if not x.is_cuda:
            raise RuntimeError(f"LORA_KERNELS_BACKEND=cuda needs CUDA tensors, got device {x.device}")
        if x.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"x has dtype {x.dtype}: the CUDA backend supports float16, bfloat16 and float32 "
                             "(use LORA_KERNELS_BACKEND=torch for float64)")
        return "cuda"
    return "torch"


def _dot_precision(dtype: torch.dtype) -> str:
    """Follow torch's own TF32 switch for float32 matmuls, so fp32 results match nn.Linear's."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but weight has in_features={K} "
                         f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A has rank r={r}; r must be >= 1")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must have shape ({N}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({N},), got {shape}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(float(scaling))):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p: float = 0.0, training: bool = True):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with x of shape (..., in_features).

    weight (out, in) and bias (out,) are the base layer's; lora_A (r, in) and lora_B (out, r) may be in
    float32 while x is half precision (they are cast inside the kernels). The output has x's dtype.
    Dropout applies only when `training` and dropout_p > 0; its seed comes from torch's generator of
    x's device, so torch.manual_seed reproduces a step.
    """
    _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast semantics of nn.Linear for the base path; the adapters stay in their own dtype.
        dt = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x has dtype {x.dtype} but weight has {weight.dtype}"
                         + ("" if bias is None else f" and bias has {bias.dtype}")
                         + ": the base layer must be in the activation dtype (or run under torch.autocast)")
    p = float(dropout_p) if training else 0.0
    backend = resolve_backend(x)
    if backend == "cuda":
        from .cuda_backend import CudaLoraLinear as fn
    else:
        fn = TritonLoraLinear if backend == "triton" else TorchLoraLinear
    with torch.autocast(device_type, enabled=False):
        return fn.apply(x, weight, bias, lora_A, lora_B, float(scaling), p)


_warned_copy = False


def _rows_or_copy(t: torch.Tensor):
    """The kernels' row layout of t; a layout they cannot address is copied once, with a warning."""
    from .ops.layout import rows_of

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


# The Triton passes are registered as torch.library custom ops so torch.compile sees them as opaque
# nodes with known output shapes (fake implementations) instead of breaking the graph on a kernel launch.
@torch.library.custom_op("lora_kernels::triton_lora_fwd", mutates_args=())
def triton_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """(y, xa = dropout(x)·Aᵀ as (M, r) float32, seed): forward passes 1 and 2."""
    from .ops.lora_linear_fwd import lora_linear_fwd
    from .ops.lora_shrink import lora_shrink

    x, rows = _rows_or_copy(x)
    precision = _dot_precision(x.dtype)
    seed = draw_seed(x.device) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64, device=x.device)
    if rows.M == 0:
        xa = torch.zeros((0, lora_A.shape[0]), dtype=torch.float32, device=x.device)
        return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device), xa, seed
    xa = lora_shrink(x, rows, lora_A, seed, dropout_p, precision)
    run = lambda gemm: lora_linear_fwd(x, rows, weight, bias, xa, lora_B, scaling, precision, gemm)  # noqa: E731
    key = gemm_key("fwd", x, rows.M, x.shape[-1], weight.shape[0], lora_A.shape[0], bias=bias is not None)
    return run(choose_gemm(key, x.device, run)), xa, seed


@triton_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    M = x.numel() // x.shape[-1]
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("lora_kernels::triton_lora_bwd", mutates_args=())
def triton_lora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float, need_x: bool,
                    need_a: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B), each empty when not needed: backward passes 1 and 2."""
    from .ops.lora_dy_b import lora_dy_b
    from .ops.lora_linear_bwd_dx import lora_linear_bwd_dx

    grad_x, grad_a, grad_b = x.new_empty((0,)), lora_A.new_empty((0,)), lora_B.new_empty((0,))
    dy, dy_rows = _rows_or_copy(dy.to(x.dtype))
    if dy_rows.M == 0:
        return (torch.zeros_like(x) if need_x else grad_x, torch.zeros_like(lora_A) if need_a else grad_a,
                torch.zeros_like(lora_B) if need_b else grad_b)
    x, x_rows = _rows_or_copy(x)
    precision = _dot_precision(x.dtype)
    dyb, grad_b32 = lora_dy_b(dy, dy_rows, lora_B, xa, scaling, compute_dyb=need_x or need_a,
                              compute_grad_b=need_b, dot_precision=precision)
    if need_x or need_a:
        run = lambda gemm: lora_linear_bwd_dx(  # noqa: E731
            dy, dy_rows, weight, dyb, lora_A, x, x_rows, seed, scaling, dropout_p, compute_dx=need_x,
            compute_grad_a=need_a, dot_precision=precision, gemm=gemm)
        # Without grad_x there is no base GEMM to place.
        key = gemm_key("bwd", x, x_rows.M, x.shape[-1], dy.shape[-1], lora_A.shape[0], dropout=dropout_p > 0.0,
                       grad_A=need_a)
        dx, grad_a32 = run(choose_gemm(key, x.device, run) if need_x else "fused")
        if need_x:
            grad_x = dx
        if need_a:
            grad_a = grad_a32.to(lora_A.dtype)
    if need_b:
        grad_b = grad_b32.to(lora_B.dtype)
    return grad_x, grad_a, grad_b


@triton_lora_bwd.register_fake
def _(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
            lora_A.new_empty(lora_A.shape) if need_a else lora_A.new_empty((0,)),
            lora_B.new_empty(lora_B.shape) if need_b else lora_B.new_empty((0,)))


TritonLoraLinear = lora_function(
    "TritonLoraLinear", torch.ops.lora_kernels.triton_lora_fwd, torch.ops.lora_kernels.triton_lora_bwd,
    "Triton backend: 2 kernel launches forward, 2 backward (see lora_kernels/ops/).")
