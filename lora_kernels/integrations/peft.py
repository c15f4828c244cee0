"""fuse_peft_model: make an existing PEFT model's LoRA Linear layers run on the fused kernels, in place.

Each eligible `peft.tuners.lora.Linear` gets its class switched to `FusedPeftLinear`, a subclass that only
overrides forward. Parameters, state-dict keys and every PEFT method stay PEFT's own, so save_pretrained,
from_pretrained, merge_and_unload, disable_adapter and set_adapter keep working. Whenever a call is one the kernels
cannot compute exactly (adapter merged or disabled, several active adapters, mixed-batch adapter_names, DoRA,
lora_bias), the layer runs PEFT's original forward for that call.

QLoRA: PEFT's `lora.bnb.Linear4bit` layers (a bitsandbytes 4-bit base) become `FusedPeftLinear4bit` the same way;
their forward hands the Params4bit to the kernels, which dequantize W inside the GEMMs (bitsandbytes' dequantize
is never called). `lora.bnb.Linear8bitLt` layers are reported as skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.nn as nn
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer

from ..functional import fused_lora_linear


def _unservable_reason(layer: PeftLoraLinear, adapter: Optional[str] = None, base_type=nn.Linear) -> Optional[str]:
    """Why `layer` cannot run `adapter` (default: its only active adapter) on the kernels, or None if it can."""
    if adapter is None:
        active = list(layer.active_adapters)
        if len(active) != 1:
            return f"{len(active)} active adapters {active} (the kernels compute one)"
        adapter = active[0]
    if adapter not in layer.lora_A:
        return f"no LoRA weights for active adapter {adapter!r}"
    if adapter in layer.lora_variant or layer.use_dora.get(adapter, False):
        return f"adapter {adapter!r} uses a LoRA variant ({type(layer.lora_variant.get(adapter)).__name__}, e.g. DoRA)"
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weight)"
    base = layer.get_base_layer()
    if type(base) is not base_type:
        return f"base layer is a {type(base).__name__}, not a plain {base_type.__name__}"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return f"dropout module is a {type(layer.lora_dropout[adapter]).__name__}"
    return None


class FusedPeftLinear(PeftLoraLinear):
    """A peft.tuners.lora.Linear whose forward runs on lora_kernels when it can (never constructed directly)."""

    def forward(self, x, *args, **kwargs):
        if args or kwargs or self.disable_adapters or self.merged or _unservable_reason(self) is not None:
            return super().forward(x, *args, **kwargs)
        adapter = self.active_adapters[0]
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        # dropout.training, not self.training: PEFT's nn.Dropout decides by its own mode.
        return fused_lora_linear(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 self.scaling[adapter], dropout_p=p, training=dropout.training)


def _peft_linear4bit():
    """PEFT's lora.bnb.Linear4bit, or None when bitsandbytes (or PEFT's bnb support) is not installed."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _fused_4bit_class():
    """FusedPeftLinear4bit, defined on first use (PEFT defines lora.bnb.Linear4bit only with bitsandbytes)."""
    global FusedPeftLinear4bit
    if FusedPeftLinear4bit is None and _peft_linear4bit() is not None:
        import bitsandbytes as bnb

        class _FusedPeftLinear4bit(_peft_linear4bit()):
            """A peft lora.bnb.Linear4bit whose forward runs on lora_kernels when it can."""

            def forward(self, x, *args, **kwargs):
                if (args or kwargs or self.disable_adapters or self.merged
                        or _unservable_reason(self, base_type=bnb.nn.Linear4bit) is not None):
                    return super().forward(x, *args, **kwargs)
                adapter = self.active_adapters[0]
                base = self.get_base_layer()
                dropout = self.lora_dropout[adapter]
                p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
                # bnb's Linear4bit computes in its compute_dtype and returns x's dtype; so do we.
                dt = base.compute_dtype if base.compute_dtype is not None else x.dtype
                bias = None if base.bias is None else base.bias.to(dt)
                y = fused_lora_linear(x.to(dt), base.weight, bias, self.lora_A[adapter].weight,
                                      self.lora_B[adapter].weight, self.scaling[adapter], dropout_p=p,
                                      training=dropout.training)
                return y.to(x.dtype)

        _FusedPeftLinear4bit.__name__ = _FusedPeftLinear4bit.__qualname__ = "FusedPeftLinear4bit"
        FusedPeftLinear4bit = _FusedPeftLinear4bit
    return FusedPeftLinear4bit


FusedPeftLinear4bit = None


@dataclass
class FuseReport:
    """What fuse_peft_model did: fused layer names, and {name: reason} for the LoRA layers left on PEFT's path."""

    fused: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"lora_kernels: fused {len(self.fused)} PEFT LoRA layer(s), left {len(self.skipped)} on PEFT's path"]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def fuse_peft_model(peft_model: nn.Module, verbose: bool = False) -> FuseReport:
    """Switch every eligible PEFT LoRA Linear layer of `peft_model` to the fused kernels, in place.

    Eligible: exactly peft.tuners.lora.Linear over a plain nn.Linear, one active adapter, no DoRA / lora_bias /
    fan_in_fan_out. Others (conv, embedding, quantized, DoRA, several active adapters) are left as they are and
    listed in the returned report's `skipped`. Undo with unfuse_peft_model.
    """
    if not isinstance(peft_model, nn.Module):
        raise ValueError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    report = FuseReport()
    for name, module in peft_model.named_modules():
        if isinstance(module, FusedPeftLinear) or (FusedPeftLinear4bit is not None
                                                   and isinstance(module, FusedPeftLinear4bit)):
            report.fused.append(name)
            continue
        if not isinstance(module, LoraLayer):
            continue
        linear4bit = _peft_linear4bit()
        if linear4bit is not None and type(module) is linear4bit:
            import bitsandbytes as bnb

            reason = _unservable_reason(module, base_type=bnb.nn.Linear4bit)
            if reason is not None:
                report.skipped[name] = reason
                continue
            module.__class__ = _fused_4bit_class()
            report.fused.append(name)
            continue
        if type(module) is not PeftLoraLinear:
            report.skipped[name] = f"{type(module).__module__}.{type(module).__name__} is not served by the kernels"
            continue
        reason = _unservable_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        module.__class__ = FusedPeftLinear
        report.fused.append(name)
    if not report.fused and not report.skipped:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA layer to fuse")
    if verbose:
        print(report)
    return report


def unfuse_peft_model(peft_model: nn.Module) -> List[str]:
    """Put every fused layer back on PEFT's own forward; returns their names."""
    names = []
    for name, module in peft_model.named_modules():
        if isinstance(module, FusedPeftLinear):
            module.__class__ = PeftLoraLinear
            names.append(name)
        elif FusedPeftLinear4bit is not None and isinstance(module, FusedPeftLinear4bit):
            module.__class__ = _peft_linear4bit()
            names.append(name)
    return names
