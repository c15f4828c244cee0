"""FusedLoraLinear4bit: FusedLoraLinear over a frozen bitsandbytes 4-bit base (QLoRA).

The layer holds the Linear4bit's own Params4bit (packed NF4/FP4 bytes + its quant state) and bias, never a float
copy of W: the kernels dequantize W inside their GEMMs (ops/dequant_4bit.py). Being a FusedLoraLinear subclass,
it is found, saved, loaded and frozen by inject.py and persistence/ like any adapter layer (PEFT's key layout).

Like bnb's Linear4bit, it computes in `compute_dtype` (bnb_4bit_compute_dtype; x's dtype when unset) and returns
x's dtype. Its merge rule is PEFT's for a 4-bit base: dequantize, add s·B·A in float32, quantize again with
the same settings — a lossy step, and it warns saying so; to_linear() gives a bnb Linear4bit back.

One adapter per 4-bit layer: a second named adapter and batch_adapters() mixed batches are refused (the
segmented multi-adapter kernels do not read a 4-bit W yet).
"""
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import dequantize, from_bnb, fused_lora_linear
from .dense import FusedLoraLinear

_ONE_ADAPTER = ("a 4-bit (QLoRA) layer holds one adapter: several named adapters and batch_adapters() mixed "
                "batches are not supported on a 4-bit base yet")

MERGE_WARNING = ("merging a LoRA adapter into a 4-bit base dequantizes W, adds s·B·A in float32 and quantizes the "
                 "result again: outputs change by the 4-bit rounding (PEFT does the same)")


class FusedLoraLinear4bit(FusedLoraLinear):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with W a frozen bitsandbytes 4-bit weight. Build it with
    FusedLoraLinear.from_linear(linear4bit, ...)."""

    one_adapter_reason = _ONE_ADAPTER
    mixed_batches = False

    @classmethod
    def from_base(cls, linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                  use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                  lora_dtype: Optional[torch.dtype] = None) -> "FusedLoraLinear4bit":
        """The layer over a bitsandbytes Linear4bit (the layer-type table's row for it)."""
        import bitsandbytes as bnb

        if not isinstance(linear, bnb.nn.Linear4bit):
            raise ValueError(f"from_linear4bit expects a bitsandbytes Linear4bit, got {type(linear).__name__}")
        from_bnb(linear.weight)  # a clear ValueError now for a weight the kernels cannot read
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.compute_dtype = linear.compute_dtype
        layer.weight_quant_state = linear.weight.quant_state
        if lora_dtype is None:  # PEFT's adapters follow the compute dtype, float32 for half precision
            dt = linear.compute_dtype or torch.float32
            lora_dtype = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        layer._init_from_base(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                              lora_dtype=lora_dtype, features=(linear.out_features, linear.in_features))
        return layer

    from_linear4bit = from_base  # its name before the layer-type table

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.compute_dtype if self.compute_dtype is not None else x.dtype

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        # The base alone (no adapter to fuse): our own dequantization, a W-sized temporary for this call only.
        dt = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dt)
        w = self._quantized_weight()
        qw = w if self.weight is not w else from_bnb(w)
        return F.linear(x.to(dt), dequantize(qw, dt), bias).to(x.dtype)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dt = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dt)
        A, B = self.adapter_params(adapter_name)
        scaling, p = self._scaling_dropout(adapter_name)
        y = fused_lora_linear(x.to(dt), self._quantized_weight(), bias, A, B, scaling, dropout_p=p,
                              training=self.training)
        return y.to(x.dtype)

    def _quantized_weight(self):
        """The 4-bit W the kernels read. Under FSDP2 the weight is, during forward, the all-gathered packed bytes as
        a plain tensor (fully_shard keeps neither the Params4bit type nor its quant_state: it shards the packed
        bytes in bnb_4bit_quant_storage's dtype), so the quant state is kept on the module, as bnb keeps it per
        module, and paired with the gathered bytes here."""
        qs = getattr(self.weight, "quant_state", None)
        if qs is not None:
            self.weight_quant_state = qs   # the newest: a merge or a device move may have replaced it
            return self.weight
        return from_bnb(self.weight, self.weight_quant_state)   # a QuantizedWeight, read without a copy

    def linear_weight(self):
        return self.weight

    # -- merge (PEFT's semantics for a 4-bit base) ---------------------------------------------------------------
    @torch.no_grad()
    def _merge_rule(self, adapter_name: str, sign: float) -> None:
        """W ← quantize(dequantize(W) ± s·B·A): PEFT's 4-bit merge; lossy, so it warns (unmerge does not give the
        original W back, only one close to it)."""
        warnings.warn(MERGE_WARNING, stacklevel=5)  # the caller of merge() / unmerge()
        self._requantize(dequantize(from_bnb(self.weight), torch.float32) + sign * self.delta_weight(adapter_name))

    def _requantize(self, merged: torch.Tensor) -> None:
        """W ← a new Params4bit quantizing `merged` (float32, (out, in)) with the current weight's settings."""
        import bitsandbytes as bnb

        w = self.weight
        qs = w.quant_state
        self.weight = bnb.nn.Params4bit(merged.to(qs.dtype).cpu(), requires_grad=False, blocksize=w.blocksize,
                                        compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                        quant_storage=w.quant_storage).to(w.device)
        if self.weight.quant_state is None:  # on CPU, .to("cpu") does not quantize
            self.weight = self.weight._quantize(w.device)

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
