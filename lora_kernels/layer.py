"""FusedLoraLinear: a drop-in for nn.Linear with a LoRA adapter running on the fused kernels.

The module only holds parameters and does init, merge and repr; the math is in functional.py.
Parameter names follow nn.Linear for the frozen base (`weight`, `bias`, so base checkpoints load
unchanged) and PEFT's tensor layouts for the adapter (`lora_A` is (r, in), `lora_B` is (out, r)).

GPT-2's projections are transformers' Conv1D, a linear layer whose weight is stored (in, out). Wrapped,
the layer keeps that weight as it is (fan_in_fan_out=True, PEFT's name for it) and hands the kernels its
transposed view: the launchers take any strides, so nothing is copied.

FusedLoraLinear4bit (QLoRA, at the end of this file): the same layer over a frozen bitsandbytes 4-bit base.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_lora_args
from .functional import dequantize, from_bnb, fused_lora_linear


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 family). transformers is not imported for it: if it was never imported,
    no module can be one."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D or a FusedLoraLinear."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def is_bnb_quantized(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear (Linear4bit, Linear8bitLt). bitsandbytes is not imported for it."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def linear_sharing(weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in_fan_out: bool = False) -> nn.Module:
    """A base layer whose weight and bias are these very tensors (Parameters are kept, not copied): an
    nn.Linear, or with fan_in_fan_out a transformers Conv1D (weight (in, out)). Built without allocating a
    throwaway weight."""
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        if bias is None:
            raise ValueError("a Conv1D always has a bias; got bias=None with fan_in_fan_out=True")
        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nx, conv.nf = weight.shape
        conv.weight, conv.bias = _param(weight), _param(bias)
        return conv
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = _param(weight)
    if bias is not None:
        linear.bias = _param(bias)
    return linear


class FusedLoraLinear(nn.Module):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with W, b frozen and A, B trainable.

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. init_lora_weights follows PEFT:
    True = A kaiming-uniform(a=√5), B zeros (the layer starts equal to its base); "gaussian" = A ~ N(0, 1/r),
    B zeros; False = both random (a non-identity adapter, for tests).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: Union[bool, str] = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        factory = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._init_from_base(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                             lora_dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                    lora_dtype: Optional[torch.dtype] = None) -> "FusedLoraLinear":
        """Wrap `linear` (an nn.Linear, or a transformers Conv1D) without copying: the new layer's weight and
        bias are linear's own Parameters.

        lora_dtype defaults to PEFT's choice: float32 adapters for a half-precision base, else the base dtype.
        """
        if is_bnb_quantized(linear):  # a bitsandbytes 4-bit base: the 4-bit sibling (below)
            return FusedLoraLinear4bit.from_linear4bit(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                       use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                                                       lora_dtype=lora_dtype)
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise ValueError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if lora_dtype is None:
            lora_dtype = torch.float32 if linear.weight.dtype in (torch.float16, torch.bfloat16) else linear.weight.dtype
        layer._init_from_base(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora,
                              init_lora_weights, lora_dtype=lora_dtype, fan_in_fan_out=conv1d)
        return layer

    def _init_from_base(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_dtype,
                        fan_in_fan_out=False, features=None):
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        if features is not None:  # a packed 4-bit weight's shape is not (out, in)
            self.out_features, self.in_features = features
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        factory = {"device": weight.device, "dtype": lora_dtype if lora_dtype is not None else weight.dtype}
        self.lora_A = nn.Parameter(torch.empty((r, self.in_features), **factory))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, r), **factory))
        self.merged = False
        self.adapter_enabled = True
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            # Non-zero B so the adapter changes the output (tests, debugging).
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    # -- forward ----------------------------------------------------------------------------------
    def linear_weight(self) -> torch.Tensor:
        """The base weight as (out_features, in_features): the Parameter itself, or a Conv1D weight's
        transposed view (no copy)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return F.linear(x, self.linear_weight(), self.bias)
        return fused_lora_linear(x, self.linear_weight(), self.bias, self.lora_A, self.lora_B, self.scaling,
                                 dropout_p=self.lora_dropout, training=self.training)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the layer returns its base output only (a merged layer is unmerged for it)."""
        was_merged, was_enabled = self.merged, self.adapter_enabled
        if was_merged:
            self.unmerge()
        self.adapter_enabled = False
        try:
            yield self
        finally:
            self.adapter_enabled = was_enabled
            if was_merged:
                self.merge()

    # -- merge ------------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling·B·A in float32, the change the adapter makes to W, in W's own layout."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + scaling·B·A, computed in float32 and cast back to W's dtype."""
        if self.merged:
            raise RuntimeError("FusedLoraLinear.merge(): the adapter is already merged")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W - scaling·B·A; restores the base weight up to W's dtype rounding."""
        if not self.merged:
            raise RuntimeError("FusedLoraLinear.unmerge(): the adapter is not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """The base layer type (nn.Linear, or Conv1D) computing what this layer computes (eval mode), sharing
        its (merged) weight storage.

        Merges in place first if needed; the returned module owns the same weight and bias Parameters.
        """
        if not self.merged and self.adapter_enabled:
            self.merge()
        return linear_sharing(self.weight, self.bias, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"scaling={self.scaling:g}{', rslora' if self.use_rslora else ''}"
                f"{', fan_in_fan_out' if self.fan_in_fan_out else ''}{', merged' if self.merged else ''}")


# -- QLoRA: a bitsandbytes 4-bit base -------------------------------------------------------------------------
# FusedLoraLinear4bit: FusedLoraLinear over a frozen bitsandbytes 4-bit base (QLoRA).
#
# The layer holds the Linear4bit's own Params4bit (packed NF4/FP4 bytes + its quant state) and bias, never a float
# copy of W: the kernels dequantize W inside their GEMMs (ops/dequant_4bit.py). Being a FusedLoraLinear subclass,
# it is found, saved, loaded and frozen by inject.py and persistence.py like any adapter layer (PEFT's key layout).
#
# Like bnb's Linear4bit, it computes in `compute_dtype` (bnb_4bit_compute_dtype; x's dtype when unset) and returns
# x's dtype. merge() does what PEFT does for a 4-bit base: dequantize, add s·B·A in float32, quantize again with
# the same settings — a lossy step, and it warns saying so; to_linear() gives a bnb Linear4bit back.

MERGE_WARNING = ("merging a LoRA adapter into a 4-bit base dequantizes W, adds s·B·A in float32 and quantizes the "
                 "result again: outputs change by the 4-bit rounding (PEFT does the same)")


class FusedLoraLinear4bit(FusedLoraLinear):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with W a frozen bitsandbytes 4-bit weight. Build it with
    FusedLoraLinear.from_linear(linear4bit, ...)."""

    is_4bit = True

    @classmethod
    def from_linear4bit(cls, linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                        use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                        lora_dtype: Optional[torch.dtype] = None) -> "FusedLoraLinear4bit":
        import bitsandbytes as bnb

        if isinstance(linear, bnb.nn.Linear8bitLt):
            raise ValueError("8-bit bitsandbytes bases (Linear8bitLt) are not supported by the kernels; only 4-bit "
                             "(Linear4bit, NF4/FP4)")
        if not isinstance(linear, bnb.nn.Linear4bit):
            raise ValueError(f"from_linear4bit expects a bitsandbytes Linear4bit, got {type(linear).__name__}")
        from_bnb(linear.weight)  # a clear ValueError now for a weight the kernels cannot read
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.compute_dtype = linear.compute_dtype
        if lora_dtype is None:  # PEFT's adapters follow the compute dtype, float32 for half precision
            dt = linear.compute_dtype or torch.float32
            lora_dtype = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        layer._init_from_base(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                              lora_dtype=lora_dtype, features=(linear.out_features, linear.in_features))
        return layer

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dt)
        if self.merged or not self.adapter_enabled:
            # The base alone (no adapter to fuse): our own dequantization, a W-sized temporary for this call only.
            return F.linear(x.to(dt), dequantize(from_bnb(self.weight), dt), bias).to(x.dtype)
        y = fused_lora_linear(x.to(dt), self.weight, bias, self.lora_A, self.lora_B, self.scaling,
                              dropout_p=self.lora_dropout, training=self.training)
        return y.to(x.dtype)

    def linear_weight(self):
        return self.weight

    # -- merge (PEFT's semantics for a 4-bit base) ---------------------------------------------------------------
    @torch.no_grad()
    def _requantize(self, sign: float) -> None:
        import bitsandbytes as bnb

        warnings.warn(MERGE_WARNING, stacklevel=3)
        w = self.weight
        qs = w.quant_state
        merged = dequantize(from_bnb(w), torch.float32) + sign * self.delta_weight()
        self.weight = bnb.nn.Params4bit(merged.to(qs.dtype).cpu(), requires_grad=False, blocksize=w.blocksize,
                                        compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                        quant_storage=w.quant_storage).to(w.device)
        if self.weight.quant_state is None:  # on CPU, .to("cpu") does not quantize
            self.weight = self.weight._quantize(w.device)

    def merge(self) -> None:
        """W ← quantize(dequantize(W) + s·B·A): PEFT's 4-bit merge (lossy; warns)."""
        if self.merged:
            raise RuntimeError("FusedLoraLinear4bit.merge(): the adapter is already merged")
        self._requantize(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """W ← quantize(dequantize(W) - s·B·A): not the original W, only close to it (warns)."""
        if not self.merged:
            raise RuntimeError("FusedLoraLinear4bit.unmerge(): the adapter is not merged")
        self._requantize(-1.0)
        self.merged = False

    def to_base(self) -> nn.Module:
        """A bnb Linear4bit holding this layer's (current) weight and bias Parameters."""
        import bitsandbytes as bnb

        w = self.weight
        linear = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                   compute_dtype=self.compute_dtype, compress_statistics=w.compress_statistics,
                                   quant_type=w.quant_type, quant_storage=w.quant_storage, device="meta")
        linear.weight = w
        if self.bias is not None:
            linear.bias = self.bias
        linear.train(self.training)
        return linear

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """The merged base as a bnb Linear4bit (merge re-quantizes: see merge)."""
        if not self.merged and self.adapter_enabled:
            self.merge()
        return self.to_base()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The quant state next to the packed weight, under bnb's own keys, so the base part of a state dict reads
        # like a Linear4bit's.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        qs = getattr(self.weight, "quant_state", None)
        if qs is not None:
            for k, v in qs.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def extra_repr(self) -> str:
        qw = from_bnb(self.weight)
        return (super().extra_repr() + f", {qw.quant_type}, blocksize={qw.blocksize}"
                + (", double_quant" if qw.double_quant else ""))
