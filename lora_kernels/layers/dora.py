"""FusedDoraLinear: DoRA (PEFT's use_dora=True) over an nn.Linear or a transformers Conv1D.

Per adapter a third tensor beside lora_A and lora_B: `lora_magnitude_vector` (out,), m, PEFT's name and file key.
The layer computes g = m / ‖W + s·B·A‖ per output row (the norm detached, never building B·A) and PEFT's DoRA
output (functional.fused_dora_linear). ‖W_o‖² is cached per frozen weight and recomputed when the weight changes
(merge, load, a new base or device: its storage or version counter differs). No norm is cached across steps: the
adapter's part is recomputed every forward, in eval too (PEFT's default, ENABLE_DORA_CACHING off).

Merge is PEFT's rule: W' = g·(W + s·B·A) with the norm of the unmerged weight, kept for unmerge
(W = W'/g − s·B·A). Mixed-adapter batches are not supported (batch_adapters raises).

FusedDoraLinear4bit: the same over a bitsandbytes 4-bit base (FusedLoraLinear4bit's weight handling: the packed
Params4bit, the compute dtype, one adapter). The norm is taken of bitsandbytes' float32 dequantization of W, in
row blocks, ‖W_o‖² cached per weight; merge dequantizes, applies PEFT's DoRA rule in float32 and quantizes again
(PEFT's lora.bnb.Linear4bit DoRA merge), warning that it rounds.
"""
from __future__ import annotations

import warnings
from typing import Dict, Union

import torch

from ..functional import (W_SQ_CACHE, QuantizedWeight, cached_weight_sq_norm, dequantize, dora_norm, from_bnb,
                          fused_dora_linear)
from .dense import FusedLoraLinear
from .linear_4bit import FusedLoraLinear4bit


class FusedDoraLinear(FusedLoraLinear):
    """DoRA: y = g·(x·Wᵀ + s·x·Aᵀ·Bᵀ) + b, g = m / ‖W + s·B·A‖ (PEFT's formula with dropout: see
    functional.fused_dora_linear). m starts as ‖W + s·B·A‖ (the layer starts equal to its LoRA layer)."""

    adapter_tensor_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    peft_keys = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    mixed_batches = False
    use_dora = True

    def _adapter_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r), (self.out_features,)

    @torch.no_grad()
    def _init_adapter(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        super()._init_adapter(adapter_name, init_lora_weights)
        A, B, m = self.adapter_params(adapter_name)
        m.copy_(self.weight_norm(adapter_name))

    def weight_sq_norm(self) -> torch.Tensor:
        """‖W_o‖² (out,) of the current base weight, float32; cached until the weight's storage or version changes
        (recomputed per call under torch.compile: cached_weight_sq_norm)."""
        w = self.linear_weight()
        return cached_weight_sq_norm(self, w, lambda: (w.data_ptr(), self.weight._version, w.dtype, w.device,
                                                        tuple(w.shape)))

    def weight_norm(self, adapter_name: str) -> torch.Tensor:
        """‖W_o + s·B_o·A‖ (out,) of an adapter over the current (unmerged) weight, float32, detached."""
        A, B, _ = self.adapter_params(adapter_name)
        return dora_norm(self.linear_weight(), self.weight_sq_norm(), A, B, self._scaling_dropout(adapter_name)[0])

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        A, B, m = self.adapter_params(adapter_name)
        scaling, p = self._scaling_dropout(adapter_name)
        return fused_dora_linear(x, self.linear_weight(), self.bias, A, B, m, scaling, dropout_p=p,
                                 training=self.training, weight_sq_norm=self.weight_sq_norm())

    def _merge_rule(self, adapter_name: str, sign: float) -> None:
        """PEFT's: W' = g·(W + s·B·A) in float32, g = m / ‖W + s·B·A‖ of the unmerged W (kept for unmerge);
        unmerge W = W'/g − s·B·A. Builds B·A (out × in) once, as any merge must."""
        _, _, m = self.adapter_params(adapter_name)
        delta = self.delta_weight(adapter_name)             # s·B·A in W's layout
        norms: Dict[str, torch.Tensor] = vars(self).setdefault("_merge_norms", {})
        if sign > 0:
            norms[adapter_name] = self.weight_norm(adapter_name)
        g = m.detach().float() / norms[adapter_name]
        g = g[None, :] if self.fan_in_fan_out else g[:, None]
        w = self.weight.float()
        new = g * (w + delta) if sign > 0 else w / g - delta
        if sign < 0:
            del norms[adapter_name]
        self.weight.copy_(new.to(self.weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"


MERGE_WARNING_4BIT = ("merging a DoRA adapter into a 4-bit base dequantizes W, computes g·(W + s·B·A) in float32 "
                      "and quantizes the result again: outputs change by the 4-bit rounding (PEFT does the same)")


class FusedDoraLinear4bit(FusedDoraLinear, FusedLoraLinear4bit):
    """DoRA over a frozen bitsandbytes 4-bit base (module docstring). Build it with
    FusedDoraLinear.from_linear(linear4bit, ...) or inject_lora(..., LoraConfig(use_dora=True))."""

    def _packed(self) -> QuantizedWeight:
        w = self._quantized_weight()
        return w if isinstance(w, QuantizedWeight) else from_bnb(w)

    def weight_sq_norm(self) -> torch.Tensor:
        """‖W_o‖² (out,) float32 of the base's float32 dequantization, read in row blocks; cached until the weight
        changes (its object, storage or version: a merge puts a new Params4bit in place)."""
        qw = self._packed()
        return cached_weight_sq_norm(self, qw, lambda: (id(self.weight), qw.packed.data_ptr(), qw.absmax.data_ptr(),
                                                         self.weight._version, qw.device))

    def weight_norm(self, adapter_name: str) -> torch.Tensor:
        A, B, _ = self.adapter_params(adapter_name)
        return dora_norm(self._packed(), self.weight_sq_norm(), A, B, self._scaling_dropout(adapter_name)[0])

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dt = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dt)
        A, B, m = self.adapter_params(adapter_name)
        scaling, p = self._scaling_dropout(adapter_name)
        y = fused_dora_linear(x.to(dt), self._quantized_weight(), bias, A, B, m, scaling, dropout_p=p,
                              training=self.training, weight_sq_norm=self.weight_sq_norm())
        return y.to(x.dtype)

    @torch.no_grad()
    def _merge_rule(self, adapter_name: str, sign: float) -> None:
        """PEFT's 4-bit DoRA merge: W' = quantize(g·(dequantize(W) + s·B·A)), g from the unmerged W's norm (kept
        for unmerge: W = quantize(dequantize(W')/g − s·B·A)). Lossy, so it warns. As PEFT, W is dequantized to the
        quant state's dtype (bitsandbytes' dequantize_4bit), the norm taken of that W + s·B·A, all in float32
        (a merge builds W anyway)."""
        warnings.warn(MERGE_WARNING_4BIT, stacklevel=5)  # the caller of merge() / unmerge()
        _, _, m = self.adapter_params(adapter_name)
        w = dequantize(self._packed(), self.weight_quant_state.dtype).float()
        delta = self.delta_weight(adapter_name)
        norms: Dict[str, torch.Tensor] = vars(self).setdefault("_merge_norms", {})
        if sign > 0:
            norms[adapter_name] = torch.linalg.vector_norm(w + delta, dim=1)
        g = (m.detach().float() / norms[adapter_name])[:, None]
        self._requantize(g * (w + delta) if sign > 0 else w / g - delta)
        if sign < 0:
            del norms[adapter_name]
        vars(self).pop(W_SQ_CACHE, None)  # a new Params4bit: its storage may reuse the old one's address
