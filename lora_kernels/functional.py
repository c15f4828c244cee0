"""fused_lora_linear: validation, autocast, and dispatch to a backend (lora_kernels/backends/).

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

Backends (LORA_KERNELS_BACKEND): auto | triton | torch | cuda; backends/__init__.py says which runs when.
Every backend saves x and x·Aᵀ (plus a seed) for backward, never a dropout mask, a dropped copy or a cast
copy of x.

QLoRA: `weight` may be a 4-bit base — a bitsandbytes Params4bit or a QuantizedWeight (ops/format_4bit.py) —
and it then runs on the 4-bit ops of the triton or torch backend (backends/base.py, QLoraLinearFunction): the same
math with W dequantized inside the kernels, bit for bit as bitsandbytes dequantizes it.
"""
import math

import torch

from .backends import FUNCTIONS, FUNCTIONS_4BIT, resolve_backend, resolve_backend_4bit
from .backends.base import FLOAT_DTYPES, QuantizedWeight, dequantize, from_bnb  # noqa: F401  (the 4-bit format)


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
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
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() != 0 or not scaling.dtype.is_floating_point:
            raise ValueError("scaling must be a finite number or a 0-dim floating-point tensor, got a tensor of "
                             f"shape {tuple(scaling.shape)} and dtype {scaling.dtype}")
    elif isinstance(scaling, bool) or not (isinstance(scaling, (int, float)) and math.isfinite(float(scaling))):
        raise ValueError(f"scaling must be a finite number or a 0-dim floating-point tensor, got {scaling!r}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p: float = 0.0, training: bool = True):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with x of shape (..., in_features).

    weight (out, in) and bias (out,) are the base layer's; lora_A (r, in) and lora_B (out, r) may be in
    float32 while x is half precision (they are cast inside the kernels). The output has x's dtype.
    Dropout applies only when `training` and dropout_p > 0; its seed comes from torch's generator of
    x's device, so torch.manual_seed reproduces a step.

    scaling is a number, or a 0-dim tensor on any device (PEFT's compiled hotswap keeps it as one so a new
    adapter's scaling is a fill_, not a recompile). A tensor is never read on the host: it scales lora_B
    (an out×r product, on device, differentiable) and the kernels run with scaling 1. Its finiteness is
    not checked, since that would cost a device sync per call.
    """
    qweight = as_quantized(weight)
    if qweight is not None:
        return _fused_qlora_linear(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, training)
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
    fn = FUNCTIONS[resolve_backend(x)]
    with torch.autocast(device_type, enabled=False):
        if isinstance(scaling, torch.Tensor):
            # s·xa·Bᵀ = xa·(s·B)ᵀ; autograd turns the gradient of s·B into s·grad_B. Kept in at least float32
            # so a half-precision lora_B is not rounded twice.
            dt = torch.promote_types(lora_B.dtype, torch.float32)
            lora_B, scaling = lora_B.to(dt) * scaling.to(device=x.device, dtype=dt), 1.0
        return fn.apply(x, weight, bias, lora_A, lora_B, float(scaling), p)


def as_quantized(weight):
    """weight's QuantizedWeight if it is a 4-bit base (a QuantizedWeight, or a quantized bitsandbytes Params4bit),
    else None."""
    if isinstance(weight, QuantizedWeight):
        return weight
    if getattr(weight, "quant_state", None) is not None:
        return from_bnb(weight)
    return None


def _fused_qlora_linear(x, qweight: QuantizedWeight, bias, lora_A, lora_B, scaling, dropout_p, training):
    """fused_lora_linear over a 4-bit base: W is dequantized (to x's dtype) inside the backend's ops only."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    # A zero-stride stand-in with W's shape (nothing W-sized is allocated) lets the dense checks apply unchanged.
    _validate(x, x.new_empty(()).expand(qweight.shape), bias, lora_A, lora_B, scaling, dropout_p)
    if qweight.device != x.device:
        raise ValueError(f"the 4-bit weight is on {qweight.device} but x is on {x.device}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x = x.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"x has dtype {x.dtype} but bias has {bias.dtype}: the base layer's bias must be in the "
                         "activation dtype (or run under torch.autocast)")
    p = float(dropout_p) if training else 0.0
    fn = FUNCTIONS_4BIT[resolve_backend_4bit(x)]
    with torch.autocast(device_type, enabled=False):
        if isinstance(scaling, torch.Tensor):
            dt = torch.promote_types(lora_B.dtype, torch.float32)
            lora_B, scaling = lora_B.to(dt) * scaling.to(device=x.device, dtype=dt), 1.0
        return fn.apply(x, *qweight.tensors(), bias, lora_A, lora_B, float(scaling), p, qweight.quant_type,
                        qweight.blocksize, qweight.nested_blocksize, qweight.shape[0])
