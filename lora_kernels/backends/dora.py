"""DoRA (PEFT's use_dora=True): the column norm without B·A, and the autograd Function (torch or Triton forward).

    n_o = ‖W_o + s·B_o·A‖ (detached)      g = m / n      xd = dropout_p(x)
    p > 0 (training):  y = x·Wᵀ + b + (g − 1)·(xd·Wᵀ) + g·s·(xd·Aᵀ)·Bᵀ
    p = 0 or eval:     y = g·(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b

which is PEFT's DoraLinearLayer exactly (the bias outside g; with dropout PEFT's second base GEMM on the
dropped input). The norm comes from ‖W_o + s·B_o·A‖² = ‖W_o‖² + 2s·B_o·(A·W_oᵀ) + s²·B_o·(A·Aᵀ)·B_oᵀ: ‖W_o‖²
once per frozen weight, A·Wᵀ (r × out) and A·Aᵀ (r × r) per call, in float32 (float64 for a float64 weight).
A half-precision W is read in row blocks of ROW_BLOCK, so no (out × in) tensor is ever built.

A 4-bit base (a QuantizedWeight, QLoRA): the norm takes bitsandbytes' float32 dequantization (code·absmax, before
its rounding to an output dtype). ‖W_o‖² reads W ROW_BLOCK rows at a time (format_4bit.dequantize_rows, torch), a
transient of about ROW_BLOCK·in·17 bytes, never W; A·Wᵀ per call runs on the 4-bit forward GEMM kernel on the
Triton backend (A as its rows, W dequantized in registers) and from the row blocks on the torch backend. The
forward and backward run the same Triton kernels with W dequantized tile by tile in registers (to x's dtype); the
torch backend dequantizes W once per forward and once per backward (a W-sized temporary, freed, never saved).

DoraLinearFunction saves x, xa = xd·Aᵀ (r columns), the seed, g, n and v = xd·Wᵀ + s·xa·Bᵀ (out columns,
x's dtype): m's gradient is Σ_rows dy ⊙ v / n, and v is saved rather than recomputed because recomputing
it costs a second (M × in × out) GEMM in backward. Never a mask, a dropped copy of x, or B·A. On the Triton
backend the forward is lora_shrink plus ops/dora_linear_fwd.py (one GEMM pass, two MMAs per k-step with dropout)
and the mask is the kernels' Philox one; otherwise torch's matmuls and torch_keep_mask. The backward's g·dy makes
the LoRA gradients those of plain LoRA, so on Triton the LoRA backward kernels run with g·dy (grad_A, grad_B, and
grad_x without dropout) and ops/dora_linear_bwd_dx.py gives grad_x with dropout; grad_m and a trainable base's
gradients are torch's (grad_m a column sum), the mask regenerated from the seed: grad_B = s·(g·dy)ᵀ·xa, grad_A = s·((g·dy)·B)ᵀ·xd, and grad_x =
(g·dy)·W + s·((g·dy)·B)·A without dropout, dy·W + ((g − 1)·dy·W + s·((g·dy)·B)·A)⊙mask/(1 − p) with it.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.format_4bit import QuantizedWeight, absmax_float, dequantize, dequantize_rows
from . import base
from .base import draw_seed, flat, no_seed, on_device_of
from .torch import torch_keep_mask

ROW_BLOCK = 256  # rows of a half-precision W cast to float32 at a time


def _norm_dtype(weight) -> torch.dtype:
    """float32 (float64 for a float64 W); a 4-bit W's values are bitsandbytes' float32 dequantization."""
    return torch.float32 if isinstance(weight, QuantizedWeight) else torch.promote_types(weight.dtype, torch.float32)


def _row_blocks(weight):
    """(start, rows of W in the norm's dtype): W itself when it is already in it, else ROW_BLOCK rows at a time
    (a 4-bit W dequantized to float32: code·absmax, the products bitsandbytes rounds to its output dtype)."""
    dt = _norm_dtype(weight)
    if isinstance(weight, QuantizedWeight):
        scales = absmax_float(weight)  # one float32 per quantization block (1/blocksize of W)
        for i in range(0, weight.shape[0], ROW_BLOCK):
            yield i, dequantize_rows(weight, i, i + ROW_BLOCK, dt, scales)
        return
    if weight.dtype == dt:
        yield 0, weight
        return
    for i in range(0, weight.shape[0], ROW_BLOCK):
        yield i, weight[i:i + ROW_BLOCK].to(dt)


# torch.compile: ‖W_o‖², the norm, the forward and the backward are torch.library custom ops (opaque nodes with
# fake impls, as the LoRA backends' passes are), so a compiled DoRA layer has no graph break. A W travels as
# [W] (dense) or [None, *QuantizedWeight.tensors()] (4-bit) with its metadata: ops take tensors, not a
# QuantizedWeight.
WeightArgs = Tuple[List[Optional[torch.Tensor]], str, int, int]


def _weight_args(weight) -> WeightArgs:
    if isinstance(weight, QuantizedWeight):
        return [None, *weight.tensors()], weight.quant_type, weight.blocksize, weight.nested_blocksize
    return [weight], "", 0, 0


def _weight_from(ws, quant_type: str, blocksize: int, nested_blocksize: int, out_features: int, in_features: int):
    """The W _weight_args took apart."""
    if ws[0] is not None:
        return ws[0]
    return base.quantized_weight(*ws[1:], quant_type, blocksize, nested_blocksize, out_features, in_features)


@torch.library.custom_op("lora_kernels::dora_weight_sq_norm", mutates_args=())
def _weight_sq_norm_op(ws: List[Optional[torch.Tensor]], quant_type: str, blocksize: int, nested_blocksize: int,
                       out_features: int, in_features: int) -> torch.Tensor:
    weight = _weight_from(ws, quant_type, blocksize, nested_blocksize, out_features, in_features)
    with torch.no_grad():
        parts = [torch.linalg.vector_norm(rows, dim=1) for _, rows in _row_blocks(weight)]
    n = torch.cat(parts) if len(parts) > 1 else parts[0]
    return n * n


@_weight_sq_norm_op.register_fake
def _(ws, quant_type, blocksize, nested_blocksize, out_features, in_features):
    weight = _weight_from(ws, quant_type, blocksize, nested_blocksize, out_features, in_features)
    return next(t for t in ws if t is not None).new_empty((out_features,), dtype=_norm_dtype(weight))


def weight_sq_norm(weight) -> torch.Tensor:
    """‖W_o‖² per output row of an (out, in) weight (a dense one, or a 4-bit QuantizedWeight read in row blocks),
    float32 (float64 for a float64 W)."""
    with torch.no_grad():  # a trainable W's norm is a constant too
        return _weight_sq_norm_op(*_weight_args(weight), *weight.shape)


W_SQ_CACHE = "_lora_kernels_w_sq"  # (key, ‖W_o‖²) in the __dict__ of the module that caches it


def cached_weight_sq_norm(owner, weight, key) -> torch.Tensor:
    """weight_sq_norm(weight), cached on the module `owner` until key() (what identifies the frozen weight: its
    object, storage, version) changes; `vars(owner).pop(W_SQ_CACHE)` forgets it. Under torch.compile it is an op of
    the graph, recomputed per call: a graph cannot key a cache on data pointers."""
    if torch.compiler.is_compiling():
        return weight_sq_norm(weight)
    k = key()
    cached = vars(owner).get(W_SQ_CACHE)
    if cached is None or cached[0] != k:
        cached = (k, weight_sq_norm(weight))
        vars(owner)[W_SQ_CACHE] = cached
    return cached[1]


def _a_wt_4bit_triton(qweight: QuantizedWeight, A: torch.Tensor) -> torch.Tensor:
    """A·Wᵀ (r, out) float32 for a 4-bit W on the 4-bit forward GEMM kernel (ops/lora_linear_fwd.py: A as its r
    rows of x, no adapter term, W dequantized tile by tile in registers to float32, IEEE float32 dots): no
    dequantized W in memory, and 0.5 B per weight read instead of a torch dequantization pass."""
    from ..ops.layout import rows_of
    from ..ops.lora_linear_fwd import lora_linear_fwd

    A = A.contiguous()
    none = A.new_empty((A.shape[0], 0))
    with base.on_device(A):  # looked up per call: tests spy on the device switch
        return lora_linear_fwd(A, rows_of(A), qweight, None, none, A.new_empty((qweight.shape[0], 0)), 0.0, "ieee",
                               "fused")


@torch.library.custom_op("lora_kernels::dora_norm", mutates_args=())
def _dora_norm_op(ws: List[Optional[torch.Tensor]], quant_type: str, blocksize: int, nested_blocksize: int,
                  w_sq: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  backend: str) -> torch.Tensor:
    weight = _weight_from(ws, quant_type, blocksize, nested_blocksize, lora_B.shape[0], lora_A.shape[1])
    dt = _norm_dtype(weight)
    with torch.no_grad():
        A, B = lora_A.to(dt), lora_B.to(dt)
        if backend == "triton" and isinstance(weight, QuantizedWeight):
            awt = _a_wt_4bit_triton(weight, A)                                         # (r, out)
        else:
            awt = torch.cat([A @ rows.t() for _, rows in _row_blocks(weight)], dim=1)  # (r, out)
        aat = A @ A.t()                                                                # (r, r)
        sq = w_sq.to(dt) + (2.0 * scaling) * (B * awt.t()).sum(1) + (scaling * scaling) * ((B @ aat) * B).sum(1)
        return sq.clamp_min(0.0).sqrt()


@_dora_norm_op.register_fake
def _(ws, quant_type, blocksize, nested_blocksize, w_sq, lora_A, lora_B, scaling, backend):
    weight = _weight_from(ws, quant_type, blocksize, nested_blocksize, lora_B.shape[0], lora_A.shape[1])
    return w_sq.new_empty((lora_B.shape[0],), dtype=_norm_dtype(weight))


def dora_norm(weight, w_sq: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scaling: float, backend: str = "torch") -> torch.Tensor:
    """n_o = ‖W_o + s·B_o·A‖ (out,), detached, from w_sq = weight_sq_norm(weight) without building B·A. backend
    "triton" with a 4-bit W: A·Wᵀ on the 4-bit GEMM kernel; else from W's row blocks in torch."""
    with torch.no_grad():
        return _dora_norm_op(*_weight_args(weight), w_sq, lora_A, lora_B, scaling, backend)


@on_device_of(0)  # Triton launches on the current device: x's
def _triton_forward(x, weight, bias, lora_A, lora_B, g, scaling, p):
    """(y, xa, seed, v) from the kernels: lora_shrink for xa = xd·Aᵀ, then ops/dora_linear_fwd.py."""
    from ..ops.dora_linear_fwd import dora_linear_fwd
    from ..ops.lora_shrink import lora_shrink
    from .triton import _rows_or_copy, dot_precision

    x, rows = _rows_or_copy(x)
    precision = dot_precision(x.dtype)
    seed = draw_seed(x.device) if p > 0.0 else no_seed(x.device)
    xa = lora_shrink(x, rows, lora_A, seed, p, precision)
    y, v = dora_linear_fwd(x, rows, weight, bias, xa, lora_B, g.float().contiguous(), seed, scaling, p, precision)
    return y, xa, seed, v


def _torch_forward(x, weight, bias, A, B, gd, s: float, p: float):
    """(y, xa, seed, v) in plain PyTorch (A, B and gd = g already in x's dtype); the mask torch_keep_mask's."""
    dt = x.dtype
    if p > 0.0:
        seed = draw_seed(x.device)
        keep = torch_keep_mask(int(seed.item()), x.shape, p, x.device)
        xd = x * keep.to(dt) * (1.0 / (1.0 - p))
        del keep
        xa = F.linear(xd, A)
        bd = F.linear(xd, weight)                # PEFT's second base GEMM, on the dropped input
        del xd
        lo = F.linear(xa, B)
        v = bd + s * lo
        y = F.linear(x, weight, bias) + (gd - 1.0) * bd + (gd * s) * lo
        return y, xa, seed, v
    seed = no_seed(x.device)
    xa = F.linear(x, A)
    v = F.linear(x, weight) + s * F.linear(xa, B)
    y = gd * v if bias is None else torch.addcmul(bias.to(dt), gd, v)
    return y, xa, seed, v


def _keep_mask(backend: str, seed, x, p: float) -> torch.Tensor:
    """The (M, K) keep-mask the forward of `backend` drew from `seed`, regenerated for backward."""
    if backend == "triton":
        from ..ops.dropout import dropout_mask

        return dropout_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p)
    return flat(torch_keep_mask(int(seed.item()), x.shape, p, x.device))


@torch.library.custom_op("lora_kernels::dora_fwd", mutates_args=())
def _dora_fwd(x: torch.Tensor, ws: List[Optional[torch.Tensor]], quant_type: str, blocksize: int,
              nested_blocksize: int, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
              g: torch.Tensor, scaling: float, dropout_p: float,
              backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, xa, seed, v) of the module docstring."""
    weight = _weight_from(ws, quant_type, blocksize, nested_blocksize, g.shape[0], x.shape[-1])
    if backend == "triton" and x.numel() > 0:
        return _triton_forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p)
    dt = x.dtype  # torch; over a 4-bit base W is dequantized for this call only
    w = dequantize(weight, dt) if isinstance(weight, QuantizedWeight) else weight
    return _torch_forward(x, w, bias, lora_A.to(dt), lora_B.to(dt), g.to(dt), scaling, dropout_p)


@_dora_fwd.register_fake
def _(x, ws, quant_type, blocksize, nested_blocksize, bias, lora_A, lora_B, g, scaling, dropout_p, backend):
    y = x.new_empty((*x.shape[:-1], g.shape[0]))
    if backend == "triton" and x.numel() > 0:
        xa = x.new_empty((x.numel() // x.shape[-1], lora_A.shape[0]), dtype=torch.float32)
    else:
        xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]))
    return y, xa, x.new_empty((1,), dtype=torch.int64), x.new_empty(y.shape)


@torch.library.custom_op("lora_kernels::dora_bwd", mutates_args=())
def _dora_bwd(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, seed: torch.Tensor,
              ws: List[Optional[torch.Tensor]], quant_type: str, blocksize: int, nested_blocksize: int,
              lora_A: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor, norm: torch.Tensor, v: torch.Tensor,
              scaling: float, dropout_p: float, backend: str, need_x: bool, need_w: bool, need_a: bool,
              need_bb: bool, need_m: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """(grad_x, grad_W, grad_A, grad_B, grad_m in the norm's dtype), each empty when not asked for."""
    weight = _weight_from(ws, quant_type, blocksize, nested_blocksize, g.shape[0], x.shape[-1])
    s, p, dt = scaling, dropout_p, x.dtype
    dy2, x2, xa2, v2 = flat(dy.to(dt)), flat(x), flat(xa).to(dt), flat(v)
    A, B = lora_A.to(dt), lora_B.to(dt)
    dyg = dy2 * g.to(dt)                      # the LoRA terms see g·dy
    gx, gw, ga, gb, gm = (base.not_computed(t) for t in (x, v, lora_A, lora_B, norm))
    if backend == "triton" and x.numel() > 0:
        # The LoRA backward kernels with dy → g·dy give grad_A and grad_B, and grad_x without dropout.
        from .triton import _backward as lora_backward

        kernel_x = need_x and p == 0.0
        kx, ka, kb = lora_backward(dyg, x, xa, seed, weight, lora_A, lora_B, s, p, kernel_x, need_a, need_bb)
        gx, ga, gb = (kx.reshape(x.shape) if kernel_x else gx), (ka if need_a else ga), (kb if need_bb else gb)
        if need_x and p > 0.0:  # both base products from one pass over dy and W (ops/dora_linear_bwd_dx.py)
            from ..ops.dora_linear_bwd_dx import dora_linear_bwd_dx
            from .triton import dot_precision

            dyb32 = dyg.float() @ lora_B.float()
            with base.on_device(x):
                gx = dora_linear_bwd_dx(dy2, weight, g.float().contiguous(), dyb32, lora_A, seed, s, p,
                                        dot_precision(dt)).reshape(x.shape)
        need_a = need_bb = need_x = False
    if need_x and isinstance(weight, QuantizedWeight):  # torch over a 4-bit base: for this call only
        weight = dequantize(weight, dt)
    keep = None
    if p > 0.0 and (need_x or need_a or need_w):
        keep = _keep_mask(backend, seed, x, p).to(dt) * (1.0 / (1.0 - p))
    dyb = dyg @ B if (need_x or need_a) else None
    if need_x:
        if keep is None:
            gx = dyg @ weight + s * (dyb @ A)
        else:
            gx = dy2 @ weight + ((dyg - dy2) @ weight + s * (dyb @ A)) * keep
        gx = gx.reshape(x.shape)
    if need_w:  # a trainable base (rare): y's W terms are x·Wᵀ + (g − 1)·xd·Wᵀ, or g·x·Wᵀ without dropout
        gw = dyg.t() @ x2 if keep is None else dy2.t() @ x2 + (dyg - dy2).t() @ (x2 * keep)
        gw = gw.to(weight.dtype)
    if need_a:
        xd = x2 if keep is None else x2 * keep
        ga = (s * (dyb.t() @ xd)).to(lora_A.dtype)
    if need_bb:
        gb = (s * (dyg.t() @ xa2)).to(lora_B.dtype)
    if need_m:
        gm = (dy2.to(norm.dtype) * v2.to(norm.dtype)).sum(0) / norm
    return gx, gw, ga, gb, gm


@_dora_bwd.register_fake
def _(dy, x, xa, seed, ws, quant_type, blocksize, nested_blocksize, lora_A, lora_B, g, norm, v, scaling,
      dropout_p, backend, need_x, need_w, need_a, need_bb, need_m):
    def like(t, needed):
        return t.new_empty(t.shape) if needed else base.not_computed(t)
    return (like(x, need_x), like(ws[0], need_w) if need_w else base.not_computed(v), like(lora_A, need_a),
            like(lora_B, need_bb), like(norm, need_m))


class DoraLinearFunction(torch.autograd.Function):
    """y of the module docstring for x (..., in), with norm = dora_norm(...) (out,) given, detached. The passes
    are the custom ops above; a 4-bit W is saved as references to its packed tensors, never dequantized."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling: float, dropout_p: float,
                backend: str):
        g = magnitude.to(norm.dtype) / norm
        ws, *quant = _weight_args(weight)
        y, xa, seed, v = _dora_fwd(x, ws, *quant, bias, lora_A, lora_B, g, scaling, dropout_p, backend)
        ctx.save_for_backward(x, xa, seed, lora_A, lora_B, g, norm, v, *ws)
        ctx.meta = (quant, scaling, dropout_p, backend)
        ctx.dtypes = (None if bias is None else bias.dtype, magnitude.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, seed, lora_A, lora_B, g, norm, v, *ws = ctx.saved_tensors
        quant, s, p, backend = ctx.meta
        bias_dtype, m_dtype = ctx.dtypes
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        with torch.autocast(x.device.type, enabled=False):
            gx, gw, ga, gb, gm = _dora_bwd(dy, x, xa, seed, ws, *quant, lora_A, lora_B, g, norm, v, s, p, backend,
                                           need_x, need_w, need_a, need_bb, need_m)
            grad_bias = flat(dy.to(x.dtype)).sum(0).to(bias_dtype) if (need_b and bias_dtype is not None) else None
        return (gx if need_x else None, gw if need_w else None, grad_bias, ga if need_a else None,
                gb if need_bb else None, gm.to(m_dtype) if need_m else None, None, None, None, None)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float,
                w_sq: Optional[torch.Tensor] = None, backend: str = "torch"):
    """The DoRA linear; w_sq: a cached weight_sq_norm(weight), else computed here. backend "triton": the forward
    runs on the kernels (ops/dora_linear_fwd.py) and the mask is their Philox one; see the module docstring.
    weight may be a 4-bit QuantizedWeight (the kernels dequantize it to x's dtype; the norm takes its float32
    dequantization)."""
    w_sq = weight_sq_norm(weight) if w_sq is None else w_sq
    norm = dora_norm(weight, w_sq, lora_A, lora_B, scaling, backend if x.numel() > 0 else "torch")
    return DoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, backend)
