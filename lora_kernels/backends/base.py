"""The contract every backend implements, and the pieces all of them share.

A backend is a pair of torch.library custom ops (so torch.compile sees opaque nodes with known shapes
instead of breaking the graph on a kernel launch) wrapped by a subclass of LoraLinearFunction:

    fwd_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> (y, xa, seed)
        xa = dropout(x)·Aᵀ (r columns, any layout the backend's bwd_op reads back), seed: int64 (1,)
    bwd_op(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b)
        -> (grad_x, grad_A, grad_B), each an empty tensor when not asked for (custom ops cannot return None)

LoraLinearFunction saves x, xa and the seed (plus the parameters) for backward — never a dropout mask,
a dropped copy or a cast copy of x — and computes the rare gradients of a trainable base W and b itself.
Inputs arrive validated and cast by functional.fused_lora_linear.
"""
import contextlib
import functools
from typing import Optional, Tuple

import torch

from ..ops.format_4bit import QuantizedWeight, dequantize, from_bnb  # noqa: F401  (re-exported upwards)
from ..ops.transfer import host_to_device  # noqa: F401  (re-exported upwards: functional's row ids)

# What the kernels compute in; float64 is the torch backend's alone (the tests' oracle runs in it).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)

# Seeds are drawn in [0, SEED_BOUND) from torch's generator of x's device.
SEED_BOUND = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """One int64 seed from the default generator of `device`, left on that device (no host sync)."""
    return torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)


def no_seed(device: torch.device) -> torch.Tensor:
    """The seed saved when there is no dropout (eval mode or p = 0): no RNG draw, so no RNG state advances."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def on_device(t: torch.Tensor):
    """A context in which t's CUDA device is the current device (nothing off CUDA). Triton launches a kernel on
    the current device, not on its arguments' device: a layer on cuda:1 of a model split over GPUs
    (device_map="auto") would otherwise run on cuda:0 with cuda:1 pointers."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def on_device_of(position: int):
    """Decorator: the function runs under on_device(its positional argument `position`)."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            with on_device(args[position]):
                return fn(*args, **kwargs)
        return guarded
    return wrap


def not_computed(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor a custom op returns for a gradient nobody asked for."""
    return like.new_empty((0,))


def fake_fwd_flat_xa(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """Forward output shapes when xa is kept as an (M, r) float32 matrix (the Triton and CUDA backends)."""
    M = x.numel() // x.shape[-1]
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty((1,), dtype=torch.int64))


def fake_bwd(dy, x, xa, seed, weight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b):
    """Shapes of bwd_op's outputs for torch.compile's fake tensors (the same for every backend)."""
    return (x.new_empty(x.shape) if need_x else not_computed(x),
            lora_A.new_empty(lora_A.shape) if need_lora_a else not_computed(lora_A),
            lora_B.new_empty(lora_B.shape) if need_lora_b else not_computed(lora_B))


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def base_grads(dy, x, need_weight: bool, need_bias: bool, weight_dtype, bias_dtype):
    """Gradients of a trainable base W and b (plain matmuls: rare, and nothing to fuse)."""
    dy2 = flat(dy)
    grad_w = (dy2.t() @ flat(x).to(dy2.dtype)).to(weight_dtype) if need_weight else None
    grad_b = dy2.sum(0).to(bias_dtype) if (need_bias and bias_dtype is not None) else None
    return grad_w, grad_b


def _named_ops(cls, fwd_attr: str, bwd_attr: str):
    """The (forward, backward) custom ops a Function subclass names in these class attributes."""
    fwd_op, bwd_op = getattr(cls, fwd_attr), getattr(cls, bwd_attr)
    if fwd_op is None or bwd_op is None:
        raise TypeError(f"{cls.__name__} must set both {fwd_attr} and {bwd_attr}")
    return fwd_op, bwd_op


class LoraLinearFunction(torch.autograd.Function):
    """Base of the backends' autograd Functions. A subclass names its custom ops:

        class TritonLoraLinear(LoraLinearFunction):
            fwd_op = torch.ops.lora_kernels.triton_lora_fwd
            bwd_op = torch.ops.lora_kernels.triton_lora_bwd

    and gets forward/backward with the shared contract (module docstring). They are built per subclass
    as closures over its ops because torch's autograd Functions call forward/backward as staticmethods.
    """

    fwd_op = None
    bwd_op = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fwd_op, bwd_op = _named_ops(cls, "fwd_op", "bwd_op")

        def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float):
            y, xa, seed = fwd_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
            ctx.save_for_backward(x, xa, seed, weight, lora_A, lora_B)
            ctx.scaling, ctx.dropout_p = scaling, dropout_p
            ctx.bias_dtype = None if bias is None else bias.dtype
            return y

        def backward(ctx, dy):
            x, xa, seed, weight, lora_A, lora_B = ctx.saved_tensors
            need_x, need_weight, need_bias, need_lora_a, need_lora_b = ctx.needs_input_grad[:5]
            with torch.autocast(x.device.type, enabled=False):  # backward may be called inside an autocast region
                grad_x, grad_a, grad_b = bwd_op(dy, x, xa, seed, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p,
                                                need_x, need_lora_a, need_lora_b)
                grad_w, grad_bias = base_grads(dy, x, need_weight, need_bias, weight.dtype, ctx.bias_dtype)
            # The ops return empty tensors for gradients that were not asked for; autograd wants None.
            return (grad_x if need_x else None, grad_w, grad_bias, grad_a if need_lora_a else None,
                    grad_b if need_lora_b else None, None, None)

        cls.forward = staticmethod(forward)
        cls.backward = staticmethod(backward)


# QLoRA: the same contract with a 4-bit base (ops/format_4bit.py). The custom ops take the QuantizedWeight
# as its tensors (Nones where there is no double quantization) and its metadata as plain arguments:
#
#     qfwd_op(x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_A, lora_B, scaling, dropout_p,
#             quant_type, blocksize, nested_blocksize, out_features) -> (y, xa, seed)
#     qbwd_op(dy, x, xa, seed, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, scaling,
#             dropout_p, quant_type, blocksize, nested_blocksize, out_features, need_x, need_lora_a, need_lora_b)
#         -> (grad_x, grad_A, grad_B)
#
# Saved for backward: x, xa, the seed and references to the packed weight and its scales (no copies), never a
# dequantized W: backward dequantizes again, tile by tile on the Triton path.


def quantized_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type: str, blocksize: int,
                     nested_blocksize: int, out_features: int, in_features: int):
    """The QuantizedWeight a 4-bit custom op was called with."""
    return QuantizedWeight(packed, absmax, quant_type, blocksize, (out_features, in_features), nested_absmax,
                           nested_code, offset, nested_blocksize)


def qlora_ops(backend: str, dense_fwd, dense_bwd, xa_flat: bool):
    """Register the 4-bit custom-op pair lora_kernels::{backend}_qlora_fwd / _bwd (signatures above) and return
    them. Each rebuilds the QuantizedWeight from its arguments and runs the backend's own passes with it:

        dense_fwd(x, qweight, bias, lora_A, lora_B, scaling, dropout_p) -> (y, xa, seed)
        dense_bwd(dy, x, xa, seed, qweight, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b)

    xa_flat: the backend keeps xa as an (M, r) float32 matrix (else in x's shape and dtype), for the fake impl.
    """

    @torch.library.custom_op(f"lora_kernels::{backend}_qlora_fwd", mutates_args=())
    def qfwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
             nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float, quant_type: str,
             blocksize: int, nested_blocksize: int, out_features: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
        qw = quantized_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize,
                              nested_blocksize, out_features, x.shape[-1])
        return dense_fwd(x, qw, bias, lora_A, lora_B, scaling, dropout_p)

    @qfwd.register_fake
    def _(x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_A, lora_B, scaling, dropout_p,
          quant_type, blocksize, nested_blocksize, out_features):
        y = x.new_empty((*x.shape[:-1], out_features))
        if xa_flat:
            xa = x.new_empty((x.numel() // x.shape[-1], lora_A.shape[0]), dtype=torch.float32)
        else:
            xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]))
        return y, xa, x.new_empty((1,), dtype=torch.int64)

    @torch.library.custom_op(f"lora_kernels::{backend}_qlora_bwd", mutates_args=())
    def qbwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor, packed: torch.Tensor,
             absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
             offset: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
             dropout_p: float, quant_type: str, blocksize: int, nested_blocksize: int, out_features: int,
             need_x: bool, need_lora_a: bool, need_lora_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qw = quantized_weight(packed, absmax, nested_absmax, nested_code, offset, quant_type, blocksize,
                              nested_blocksize, out_features, x.shape[-1])
        return dense_bwd(dy, x, xa, seed, qw, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b)

    @qbwd.register_fake
    def _(dy, x, xa, seed, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, scaling, dropout_p,
          quant_type, blocksize, nested_blocksize, out_features, need_x, need_lora_a, need_lora_b):
        return fake_bwd(dy, x, xa, seed, None, lora_A, lora_B, scaling, dropout_p, need_x, need_lora_a, need_lora_b)

    return (getattr(torch.ops.lora_kernels, f"{backend}_qlora_fwd"),
            getattr(torch.ops.lora_kernels, f"{backend}_qlora_bwd"))


class QLoraLinearFunction(torch.autograd.Function):
    """LoraLinearFunction's contract over a 4-bit base: a subclass names its qfwd_op / qbwd_op (above).

    apply(x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_A, lora_B, scaling, dropout_p,
          quant_type, blocksize, nested_blocksize, out_features). The 4-bit weight is frozen (no gradient);
    a trainable bias gets its gradient here.
    """

    qfwd_op = None
    qbwd_op = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fwd_op, bwd_op = _named_ops(cls, "qfwd_op", "qbwd_op")

        def forward(ctx, x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_A, lora_B,
                    scaling: float, dropout_p: float, quant_type: str, blocksize: int, nested_blocksize: int,
                    out_features: int):
            y, xa, seed = fwd_op(x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_A, lora_B,
                                 scaling, dropout_p, quant_type, blocksize, nested_blocksize, out_features)
            ctx.save_for_backward(x, xa, seed, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B)
            ctx.meta = (scaling, dropout_p, quant_type, blocksize, nested_blocksize, out_features)
            ctx.bias_dtype = None if bias is None else bias.dtype
            return y

        def backward(ctx, dy):
            x, xa, seed, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B = ctx.saved_tensors
            need_x, need_bias, need_lora_a, need_lora_b = (ctx.needs_input_grad[0], *ctx.needs_input_grad[6:9])
            with torch.autocast(x.device.type, enabled=False):
                grad_x, grad_a, grad_b = bwd_op(dy, x, xa, seed, packed, absmax, nested_absmax, nested_code, offset,
                                                lora_A, lora_B, *ctx.meta, need_x, need_lora_a, need_lora_b)
                _, grad_bias = base_grads(dy, x, False, need_bias, None, ctx.bias_dtype)
            return (grad_x if need_x else None, None, None, None, None, None, grad_bias,
                    grad_a if need_lora_a else None, grad_b if need_lora_b else None, None, None, None, None, None,
                    None)

        cls.forward = staticmethod(forward)
        cls.backward = staticmethod(backward)


# Several adapters in one batch (functional.fused_multi_lora_linear): the same contract over stacked adapters.
#
#     multi_fwd_op(x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps)
#         -> (y, xa, seed)
#         lora_A (n, r_max, K) and lora_B (n, N, r_max): the layer's adapters zero-padded to the largest rank;
#         row_adapter (M,) int32: each logical row's adapter, -1 = base only; row_order (M,) int32: the logical
#         rows sorted by adapter (the order the kernels' row tiles walk; a backend may ignore it); ranks,
#         scalings, dropout_ps: one per adapter. xa = dropout(x)·A[a(m)]ᵀ per logical row (r_max columns; 0 for
#         base rows), one seed for all.
#     multi_bwd_op(dy, x, xa, seed, weight, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps,
#                  need_x, need_lora_a, need_lora_b) -> (grad_x, grad_A (n, r_max, K), grad_B (n, N, r_max))


def fake_multi_fwd(xa_dtype=None):
    """The fake impl of a multi-adapter forward op whose xa is (M, r_max) in `xa_dtype` (None: x's dtype)."""

    def fake(x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps):
        M = x.numel() // x.shape[-1]
        return (x.new_empty((*x.shape[:-1], weight.shape[0])),
                x.new_empty((M, lora_A.shape[1]), dtype=xa_dtype or x.dtype), x.new_empty((1,), dtype=torch.int64))

    return fake


def fake_multi_bwd(dy, x, xa, seed, weight, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps,
                   need_x, need_lora_a, need_lora_b):
    return fake_bwd(dy, x, xa, seed, weight, lora_A, lora_B, 1.0, 0.0, need_x, need_lora_a, need_lora_b)


class MultiLoraLinearFunction(torch.autograd.Function):
    """Base of the backends' multi-adapter autograd Functions; a subclass names multi_fwd_op and multi_bwd_op.

    Saves x, xa (M, r_max), the seed, the (M,) row ids and row order (both shared by the model's layers), plus the stacked adapters (parameter-sized) —
    never a per-adapter copy of x or a mask. Gradients of the stacked adapters flow back through
    the zero-padded torch.cat of functional._stack_padded to each adapter's own tensors.
    """

    fwd_op = None
    bwd_op = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fwd_op, bwd_op = _named_ops(cls, "fwd_op", "bwd_op")

        def forward(ctx, x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks, scalings, dropout_ps):
            y, xa, seed = fwd_op(x, weight, bias, lora_A, lora_B, row_adapter, row_order, ranks, scalings,
                                 dropout_ps)
            ctx.save_for_backward(x, xa, seed, weight, lora_A, lora_B, row_adapter, row_order)
            ctx.adapter_args = (ranks, scalings, dropout_ps)
            ctx.bias_dtype = None if bias is None else bias.dtype
            return y

        def backward(ctx, dy):
            x, xa, seed, weight, lora_A, lora_B, row_adapter, row_order = ctx.saved_tensors
            need_x, need_weight, need_bias, need_lora_a, need_lora_b = ctx.needs_input_grad[:5]
            with torch.autocast(x.device.type, enabled=False):
                grad_x, grad_a, grad_b = bwd_op(dy, x, xa, seed, weight, lora_A, lora_B, row_adapter, row_order,
                                                *ctx.adapter_args, need_x, need_lora_a, need_lora_b)
                grad_w, grad_bias = base_grads(dy, x, need_weight, need_bias, weight.dtype, ctx.bias_dtype)
            return (grad_x if need_x else None, grad_w, grad_bias, grad_a if need_lora_a else None,
                    grad_b if need_lora_b else None, None, None, None, None, None)

        cls.forward = staticmethod(forward)
        cls.backward = staticmethod(backward)
