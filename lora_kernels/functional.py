"""fused_lora_linear: validation, autocast, and dispatch to a backend (lora_kernels/backends/).

    y = x·Wᵀ + b + s · (dropout_p(x)·Aᵀ)·Bᵀ

Backends (LORA_KERNELS_BACKEND): auto | triton | torch | cuda; backends/__init__.py says which runs when.
Every backend saves x and x·Aᵀ (plus a seed) for backward, never a dropout mask, a dropped copy or a cast
copy of x.

QLoRA: `weight` may be a 4-bit base — a bitsandbytes Params4bit or a QuantizedWeight (ops/format_4bit.py) —
and it then runs on the 4-bit ops of the triton or torch backend (backends/base.py, QLoraLinearFunction): the same
math with W dequantized inside the kernels, bit for bit as bitsandbytes dequantizes it.

fused_multi_lora_linear: several adapters on one base layer in one mixed batch (an AdapterSegments, built
once per forward, says which row uses which adapter); the same contract, with one (M, r_max) x·Aᵀ for all
adapters.

fused_grouped_lora_linear: one MoE expert projection (a 3-D weight, PEFT's target_parameters adapters) over the
token–expert pairs sorted by expert (an ExpertRouting, built once per forward); same backend rule as the dense
entry points (Triton's grouped kernels, or the torch path).
"""
import functools
import math
from typing import Optional

import torch

from . import backends
from .backends import FUNCTIONS, FUNCTIONS_4BIT, MULTI_FUNCTIONS
from .backends.dora import (W_SQ_CACHE, cached_weight_sq_norm, dora_linear, dora_norm,  # noqa: F401  (for layers)
                             weight_sq_norm)
from .backends.base import FLOAT_DTYPES, QuantizedWeight, dequantize, from_bnb  # noqa: F401  (the 4-bit format)
from .backends.experts import ExpertRouting, grouped_lora_linear
from .backends.triton_experts import TritonGroupedLoraFunction
from .adapter_segments import AdapterSegments  # also this module's public name (lk.AdapterSegments)


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    if x.device.type == "meta":
        raise ValueError("x is on the meta device, whose tensors hold no data: materialize the layer on a real "
                         "device first (e.g. module.to_empty(device='cpu'), then load its weights)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if K == 0 or N == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: in_features and out_features must be >= 1")
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


def _base_in_activation_dtype(x, weight, bias):
    """x, weight, bias as the base GEMM takes them: nn.Linear's autocast semantics (the adapters keep their own
    dtype), else the base layer must already be in x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x has dtype {x.dtype} but weight has {weight.dtype}"
                         + ("" if bias is None else f" and bias has {bias.dtype}")
                         + ": the base layer must be in the activation dtype (or run under torch.autocast)")
    return x, weight, bias


def _fold_tensor_scaling(lora_B, scaling, device):
    """(lora_B, scaling) for the kernels. A tensor scaling is folded into lora_B, never read on the host:
    s·xa·Bᵀ = xa·(s·B)ᵀ, and autograd turns the gradient of s·B into s·grad_B. Kept in at least float32 so a
    half-precision lora_B is not rounded twice."""
    if not isinstance(scaling, torch.Tensor):
        return lora_B, float(scaling)
    dt = torch.promote_types(lora_B.dtype, torch.float32)
    return lora_B.to(dt) * scaling.to(device=device, dtype=dt), 1.0


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
    x, weight, bias = _base_in_activation_dtype(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    fn = FUNCTIONS[backends.resolve_backend(x)]  # the one dispatch decision of this call
    with torch.autocast(device_type, enabled=False):
        lora_B, scaling = _fold_tensor_scaling(lora_B, scaling, x.device)
        return fn.apply(x, weight, bias, lora_A, lora_B, float(scaling), p)


def fused_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p: float = 0.0,
                      training: bool = True, weight_sq_norm: Optional[torch.Tensor] = None):
    """DoRA (PEFT's use_dora=True): g = magnitude / ‖W + s·B·A‖ per output row (the norm detached, computed
    without building B·A), then PEFT's y = x·Wᵀ + b + (g − 1)·(xd·Wᵀ) + g·s·(xd·Aᵀ)·Bᵀ with dropout active,
    g·(x·Wᵀ + s·x·Aᵀ·Bᵀ) + b without (backends/dora.py). magnitude: (out,). weight_sq_norm: ‖W_o‖² (out,) as
    backends.dora.weight_sq_norm(weight) computes it, for a caller that caches it per frozen weight.

    On the Triton backend the forward is one fused GEMM pass (ops/dora_linear_fwd.py); backward runs the LoRA
    backward kernels with g·dy, and ops/dora_linear_bwd_dx.py for grad_x with dropout (grad_m is a torch column
    sum). LORA_KERNELS_BACKEND=cuda raises.

    weight may be a 4-bit base (a bitsandbytes Params4bit or a QuantizedWeight), as for fused_lora_linear: the
    same kernels dequantize W tile by tile to x's dtype; the norm takes W's float32 dequantization without ever
    holding W (backends/dora.py).
    """
    qweight = as_quantized(weight)
    if qweight is not None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        # A zero-stride stand-in with W's shape (nothing W-sized is allocated) for the dense checks.
        _validate(x, x.new_empty(()).expand(qweight.shape), bias, lora_A, lora_B, scaling, dropout_p)
        if qweight.device != x.device:
            raise ValueError(f"the 4-bit weight is on {qweight.device} but x is on {x.device}")
    else:
        _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    N = weight.shape[0] if qweight is None else qweight.shape[0]
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (N,) \
            or magnitude.dtype not in FLOAT_DTYPES or magnitude.device != x.device:
        what = (f"shape {tuple(magnitude.shape)}, {magnitude.dtype} on {magnitude.device}"
                if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__)
        raise ValueError(f"magnitude must be a floating-point tensor of shape ({N},) on {x.device}, got {what}")
    device_type = x.device.type
    if qweight is None:
        x, weight, bias = _base_in_activation_dtype(x, weight, bias)
    else:
        x, bias = _activation_and_bias_4bit(x, bias)
        weight = qweight
    name = backends.resolve_backend(x, four_bit=qweight is not None)
    if name == "cuda":
        raise ValueError("LORA_KERNELS_BACKEND=cuda: DoRA has no CUDA-extension kernels; use triton, torch or auto")
    p = float(dropout_p) if training else 0.0
    with torch.autocast(device_type, enabled=False):
        lora_B, scaling = _fold_tensor_scaling(lora_B, scaling, x.device)
        return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, float(scaling), p, weight_sq_norm, name)


def as_quantized(weight):
    """weight's QuantizedWeight if it is a 4-bit base (a QuantizedWeight, or a quantized bitsandbytes Params4bit),
    else None."""
    if isinstance(weight, QuantizedWeight):
        return weight
    if getattr(weight, "quant_state", None) is not None:
        return from_bnb(weight)
    return None


def _activation_and_bias_4bit(x, bias):
    """x and bias as the 4-bit kernels take them: autocast's dtype if on, and the bias in x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        x = x.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"x has dtype {x.dtype} but bias has {bias.dtype}: the base layer's bias must be in the "
                         "activation dtype (or run under torch.autocast)")
    return x, bias


def _fused_qlora_linear(x, qweight: QuantizedWeight, bias, lora_A, lora_B, scaling, dropout_p, training):
    """fused_lora_linear over a 4-bit base: W is dequantized (to x's dtype) inside the backend's ops only."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    # A zero-stride stand-in with W's shape (nothing W-sized is allocated) lets the dense checks apply unchanged.
    _validate(x, x.new_empty(()).expand(qweight.shape), bias, lora_A, lora_B, scaling, dropout_p)
    if qweight.device != x.device:
        raise ValueError(f"the 4-bit weight is on {qweight.device} but x is on {x.device}")
    device_type = x.device.type
    x, bias = _activation_and_bias_4bit(x, bias)
    p = float(dropout_p) if training else 0.0
    fn = FUNCTIONS_4BIT[backends.resolve_backend(x, four_bit=True)]  # the one dispatch decision of this call
    with torch.autocast(device_type, enabled=False):
        lora_B, scaling = _fold_tensor_scaling(lora_B, scaling, x.device)
        return fn.apply(x, *qweight.tensors(), bias, lora_A, lora_B, float(scaling), p, qweight.quant_type,
                        qweight.blocksize, qweight.nested_blocksize, qweight.shape[0])


def _validate_multi(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, segments):
    if not isinstance(segments, AdapterSegments):
        raise ValueError(f"segments must be an AdapterSegments, got {type(segments).__name__}")
    lists = {"lora_As": lora_As, "lora_Bs": lora_Bs, "scalings": scalings, "dropout_ps": dropout_ps}
    for name, seq in lists.items():
        if not isinstance(seq, (list, tuple)):
            raise ValueError(f"{name} must be a list or tuple (one entry per adapter), got {type(seq).__name__}")
    n = len(lora_As)
    if n == 0 or any(len(seq) != n for seq in lists.values()):
        raise ValueError("lora_As, lora_Bs, scalings and dropout_ps need one entry per adapter (at least one); got "
                         + ", ".join(f"{len(seq)} {name}" for name, seq in lists.items()))
    if segments.max_index >= n:
        raise ValueError(f"segments use adapter index {segments.max_index} but {n} adapters were given "
                         f"(indices 0..{n - 1})")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension, got shape {tuple(x.shape)}")
    M = math.prod(x.shape[:-1])
    if x.dim() >= 3 and x.shape[0] != segments.batch:
        raise ValueError(f"the segments describe {segments.batch} samples but x has {x.shape[0]} in its batch "
                         f"dim (x shape {tuple(x.shape)})")
    segments.rows_per_sample(M)
    present = 0
    for i in range(n):
        A, B = lora_As[i], lora_Bs[i]
        if (A is None) != (B is None):
            raise ValueError(f"lora_As[{i}] and lora_Bs[{i}] must both be tensors or both None (adapter {i} absent "
                             "from this layer)")
        if A is None:
            continue
        present += 1
        # One adapter at a time through the single-adapter checks (shapes, dtypes, devices, p, scaling).
        try:
            _validate(x, weight, bias, A, B, scalings[i], dropout_ps[i])
        except ValueError as err:
            raise ValueError(f"adapter {i}: {err}") from None
    return n, present


def _stack_padded(mats, r_max):
    """(n, r_max, C) from n matrices (r_i, C), each zero-padded to r_max rows, in one torch.cat.

    Inside autograd: cat's backward hands each matrix its own rows, so every adapter's gradient reaches its
    own tensor. One zero block (views of it pad every matrix) and one cat: the copies per layer do not grow
    with the number of adapters (parameter-sized, n·r_max·C, nothing of x's size).
    """
    pads = [r_max - m.shape[0] for m in mats]
    zeros = mats[0].new_zeros((max(pads), mats[0].shape[1])) if max(pads) > 0 else None
    pieces = []
    for m, pad in zip(mats, pads):
        pieces += [m, zeros[:pad]] if pad else [m]
    return torch.cat(pieces).view(len(mats), r_max, mats[0].shape[1])


def fused_multi_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, segments: AdapterSegments,
                            training: bool = True):
    """y = x·Wᵀ + b + s_a·(dropout_{p_a}(x[m])·A_aᵀ)·B_aᵀ for each row m, a = its sample's adapter (or none).

    Several adapters on one base layer in one mixed batch: the base GEMM runs once for the whole batch and
    the LoRA shrink / expand are segmented by adapter inside the kernels (one launch for all adapters; their
    row tiles walk the rows sorted by adapter, segments.row_order).

    lora_As[i] (r_i, in), lora_Bs[i] (out, r_i), scalings[i] (a number or a 0-dim tensor) and dropout_ps[i]
    describe adapter i of `segments` (an AdapterSegments, built once per forward and shared by every layer).
    Ranks may differ. lora_As[i] = lora_Bs[i] = None: this layer has no adapter i, its rows get the base
    output. Gradients reach each adapter's own tensors from its rows only; rows of no adapter give the base
    output and touch no adapter's gradient. One Philox seed per call; each row is dropped at its adapter's
    rate (in training only). Backends: triton and torch (LORA_KERNELS_BACKEND=cuda raises). A 4-bit (QLoRA)
    base weight is not supported (ValueError).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if as_quantized(weight) is not None:
        raise ValueError("fused_multi_lora_linear does not support a 4-bit (QLoRA) base weight (a Params4bit or "
                         "QuantizedWeight): several adapters in one batch need a dense weight; run each adapter "
                         "with fused_lora_linear, or dequantize the base first")
    n, present = _validate_multi(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, segments)
    device_type = x.device.type
    x, weight, bias = _base_in_activation_dtype(x, weight, bias)
    if present == 0:
        return torch.nn.functional.linear(x, weight, bias)
    backend = backends.resolve_backend(x)  # the one dispatch decision of this call
    if backend not in MULTI_FUNCTIONS:
        raise RuntimeError(f"LORA_KERNELS_BACKEND={backend} has no multi-adapter kernels; use triton or torch")
    # This layer's own numbering: slot j = the j-th adapter it holds; model adapters it lacks map to -1.
    slots, j = [], 0
    for A in lora_As:
        slots.append(j if A is not None else -1)
        j += A is not None
    idx = [i for i in range(n) if lora_As[i] is not None]
    ranks = [lora_As[i].shape[0] for i in idx]
    r_max = max(ranks)
    ab_dtype = functools.reduce(torch.promote_types, [lora_As[i].dtype for i in idx] + [lora_Bs[i].dtype for i in idx])
    with torch.autocast(device_type, enabled=False):
        stacked_B, float_scalings = [], []
        for i in idx:
            B, s = lora_Bs[i].to(ab_dtype), scalings[i]
            if isinstance(s, torch.Tensor):  # as fused_lora_linear: scale B on device, no host read
                B, s = B.to(torch.promote_types(ab_dtype, torch.float32)) * s.to(device=x.device), 1.0
            stacked_B.append(B)
            float_scalings.append(float(s))
        if len({t.dtype for t in stacked_B}) > 1:  # a tensor scaling lifted some B to float32
            stacked_B = [t.to(torch.promote_types(ab_dtype, torch.float32)) for t in stacked_B]
        lora_A = _stack_padded([lora_As[i].to(ab_dtype) for i in idx], r_max)  # (n, r_max, K)
        lora_B = _stack_padded([B.t() for B in stacked_B], r_max).transpose(1, 2)  # (n, N, r_max), a view
        ps = [float(dropout_ps[i]) if training else 0.0 for i in idx]
        M = math.prod(x.shape[:-1])
        row_adapter, row_order = segments.row_adapter(M, x.device, slots), segments.row_order(M, x.device)
        return MULTI_FUNCTIONS[backend].apply(x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks,
                                              float_scalings, ps)


def fused_grouped_lora_linear(x, weight, bias, lora_A, lora_B, routing: ExpertRouting, scaling: float,
                              dropout_p: float = 0.0, training: bool = True, transposed: bool = False):
    """One MoE expert projection with LoRA over rows sorted by expert: on the grouped Triton kernels
    (backends/triton_experts.py) where the dense layers would run Triton, else the torch path (backends/experts.py;
    also for a base weight or bias that requires grad).

    x: (S, in) rows in routing's order; weight: (E, out, in), or (E, in, out) with transposed; bias: (E, out) or
    None; lora_A (r·E, in) and lora_B (out, r·E) in PEFT's target_parameters layout, or both None.
    """
    E = routing.num_experts
    if weight.dim() != 3 or weight.shape[0] != E:
        raise ValueError(f"weight must be 3-D with {E} experts first, got shape {tuple(weight.shape)}")
    in_features, out_features = (weight.shape[1], weight.shape[2]) if transposed else weight.shape[2:0:-1]
    if x.dim() != 2 or x.shape[1] != in_features or x.shape[0] != routing.order.shape[0]:
        raise ValueError(f"x must have shape ({routing.order.shape[0]}, {in_features}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (E, out_features):
        raise ValueError(f"bias must be None or of shape ({E}, {out_features}), got {tuple(bias.shape)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must both be tensors or both be None")
    if lora_A is not None:
        rE = lora_A.shape[0]
        if lora_A.dim() != 2 or rE % E or lora_A.shape[1] != in_features:
            raise ValueError(f"lora_A must have shape (r·{E}, {in_features}), got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (out_features, rE):
            raise ValueError(f"lora_B must have shape ({out_features}, {rE}), got {tuple(lora_B.shape)}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    p = float(dropout_p) if training and lora_A is not None else 0.0
    backend = backends.resolve_backend(x)  # the dense layers' rule and errors: Triton where they would run it
    # A trainable base weight or bias (the grouped kernels compute no gradient for them) stays on the torch path.
    frozen_base = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if backend == "triton" and frozen_base:
        return TritonGroupedLoraFunction.apply(x, weight, bias, lora_A, lora_B, routing, float(scaling), p,
                                               transposed)
    return grouped_lora_linear(x, weight, bias, lora_A, lora_B, routing, float(scaling), p, transposed)
