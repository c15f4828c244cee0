"""PEFT's DoRA Linear (use_dora=True) on the fused DoRA path: what fuse_peft_model's FusedPeftLinear runs for a
DoRA adapter, and when it cannot.

Served: PEFT's DoraLinearVariant over an nn.Linear, a Conv1D or (lora.bnb.Linear4bit) a bitsandbytes Linear4bit,
its magnitude a plain DoraLinearLayer, no
lora_B bias, and PEFT's DoRA caching off (peft.tuners.lora.dora.ENABLE_DORA_CACHING, PEFT's default): with it on,
PEFT reuses the eval-mode norm until train() clears it, so its forward runs to keep exactly that behaviour.
Otherwise the norm is recomputed every call (never stale after a step), ‖W_o‖² cached per frozen weight on the
layer and recomputed when the weight's storage or version changes (a merge, a load). A 4-bit base computes in
its compute_dtype and returns x's dtype, as bitsandbytes does; its Params4bit goes to the kernels as it is (the
norm dequantizes it in row blocks). Mixed batches naming a DoRA adapter stay on PEFT's path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..functional import cached_weight_sq_norm, from_bnb, fused_dora_linear
from .module_hooks import hook_reason

def is_dora(layer, adapter: str) -> bool:
    return adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False)


def dora_unservable_reason(layer, adapter: str) -> Optional[str]:
    """Why the fused DoRA path cannot compute `adapter` of a dense PEFT lora.Linear, or None."""
    from peft.tuners.lora import dora
    from peft.tuners.lora.variants import DoraLinearVariant

    variant = layer.lora_variant.get(adapter)
    if type(variant) is not DoraLinearVariant:
        return f"adapter {adapter!r} uses a LoRA variant ({type(variant).__name__}) the kernels do not compute"
    if type(layer.lora_magnitude_vector[adapter]) is not dora.DoraLinearLayer:
        return f"lora_magnitude_vector[{adapter!r}] is not PEFT's DoraLinearLayer"
    if layer.lora_B[adapter].bias is not None:
        return f"adapter {adapter!r} combines DoRA with lora_bias"
    return None


def dora_call_reason(layer, x: torch.Tensor, adapter: str) -> Optional[str]:
    """Per-call reasons for PEFT's own DoRA forward: its norm cache, hooks on the magnitude module, devices."""
    from peft.tuners.lora import dora

    if dora.ENABLE_DORA_CACHING:
        return "PEFT's DoRA caching (ENABLE_DORA_CACHING) is on"
    mag = layer.lora_magnitude_vector[adapter]
    hooked = hook_reason(mag, x.device)
    if hooked is not None:  # PEFT calls the magnitude module: what its hooks do would be skipped
        return f"lora_magnitude_vector[{adapter!r}] has {hooked}"
    if mag.weight.device != x.device:
        return f"lora_magnitude_vector[{adapter!r}] is on {mag.weight.device}, x on {x.device}"
    return None


def _cached_w_sq(layer, weight: torch.Tensor) -> torch.Tensor:
    """‖W_o‖² of the base weight (a 4-bit one: of its float32 dequantization), cached on the layer per weight
    object, storage and version (PEFT's 4-bit merge puts a new Params4bit in place: its id differs)."""
    qs = getattr(weight, "quant_state", None)
    return cached_weight_sq_norm(
        layer, from_bnb(weight) if qs is not None else weight,
        lambda: (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape),
                 None if qs is None else qs.absmax.data_ptr()))


def dora_forward(layer, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """PEFT's DoRA Linear output for `adapter` on the fused path (the checks above passed)."""
    base = layer.base_layer
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    if getattr(base.weight, "quant_state", None) is not None:   # bitsandbytes Linear4bit
        dt = base.compute_dtype if base.compute_dtype is not None else x.dtype
        bias = None if base.bias is None else base.bias.to(dt)
        y = fused_dora_linear(x.to(dt), base.weight, bias, layer.lora_A[adapter].weight,
                              layer.lora_B[adapter].weight, layer.lora_magnitude_vector[adapter].weight,
                              layer.scaling[adapter], dropout_p=p, training=dropout.training,
                              weight_sq_norm=_cached_w_sq(layer, base.weight))
        return y.to(x.dtype)
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    return fused_dora_linear(x, weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                             layer.lora_magnitude_vector[adapter].weight, layer.scaling[adapter], dropout_p=p,
                             training=dropout.training, weight_sq_norm=_cached_w_sq(layer, weight))
