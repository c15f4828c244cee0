"""fuse_peft_model: make an existing PEFT model's LoRA Linear layers run on the fused kernels, in place.

Each eligible `peft.tuners.lora.Linear` gets its class switched to `FusedPeftLinear`, a subclass that only
overrides forward (and the name its repr shows: still `lora.Linear`, so `get_layer_status()` reports what PEFT
reports). Parameters, state-dict keys and every PEFT method stay PEFT's own, so save_pretrained, from_pretrained,
merge_and_unload, disable_adapter, set_adapter and hotswap keep working.

A fused layer computes a call on the kernels only when the kernels give what PEFT's forward would; otherwise it
runs PEFT's original forward for that call (decided per call, from a few attribute and dict checks). It falls
back when any of these holds:

- the call passes extra arguments other than a mixed batch's `adapter_names` (below), the adapters are disabled or
  merged, or not exactly one of the active adapters has weights in this layer (PEFT skips the others);
- the active adapter uses a LoRA variant other than DoRA (DoRA: peft_dora.py says when), or its
  dropout module is neither nn.Dropout nor nn.Identity;
- `base_layer`, `lora_A[adapter]`, `lora_B[adapter]` or `lora_dropout[adapter]` would not run its class's plain
  forward when called: it is not an nn.Linear (resp. Dropout/Identity) whose class keeps nn.Linear's forward, it
  carries forward or backward (pre-)hooks, its `forward` is replaced on the instance, or it has an accelerate
  `_hf_hook` (accelerate patches `forward` and, when offloading, loads the weights in the hook) other than a
  non-offloading AlignDevicesHook whose execution device is x's device (dispatch_model puts those on every
  module; for a module already on that device they move nothing);
- torch has global module forward or backward hooks registered (they would run around those sub-module calls);
- a weight or bias of base_layer, lora_A or lora_B is not on x's device (meta or offloaded tensors included);
- `cast_input_dtype_enabled` is False and x's dtype differs from lora_A's or lora_B's (PEFT then feeds the
  adapters x uncast; with equal dtypes the cast is a no-op and the kernels compute the same thing).

PEFT's mixed batch, `peft_model(x, adapter_names=[...])` (one adapter name or "__base__" per sample), runs on the
segmented kernels (fused_multi_lora_linear) when every adapter it names that this layer holds passes the checks
above and has no lora_B bias, and there is one name per sample of x; else PEFT's _mixed_batch_forward runs. The
row grouping (an AdapterSegments) is built once per forward: PEFT hands every layer the same names list, and
the last list's segments are reused by each layer that sees an equal list.

A transformers Conv1D base (GPT-2, fan_in_fan_out=True) is served through its weight's transposed view, and a
tensor `scaling` (PEFT's prepare_model_for_compiled_hotswap) is handled by fused_lora_linear without a host sync.

`lora_bias=True` is computed on the kernels: PEFT adds scaling·lora_B.bias to the output, which is folded into the
base bias passed to the kernels (its gradient flows back to lora_B.bias through autograd).

QLoRA: PEFT's `lora.bnb.Linear4bit` layers (a bitsandbytes 4-bit base) become `FusedPeftLinear4bit` the same way,
under the same per-call rules (the base must be a bitsandbytes Linear4bit running its class's forward); their
forward hands the Params4bit to the kernels, which dequantize W inside the GEMMs (bitsandbytes' dequantize is never
called), computing in the base's compute_dtype as bitsandbytes does (under FSDP2: the gathered packed bytes with the
quant state bitsandbytes keeps on the module). Their repr keeps PEFT's `lora.Linear4bit`.
`lora.bnb.Linear8bitLt` layers are reported as skipped.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer, ParamWrapper

from ..functional import AdapterSegments, from_bnb, fused_lora_linear, fused_multi_lora_linear
from ..layers import is_conv1d
from .module_hooks import hook_reason
from .peft_experts import FusedPeftExperts, static_reason, wrapped_by_param_wrappers
from .peft_dora import dora_call_reason, dora_forward, dora_unservable_reason, is_dora

# torch keeps the global module hooks in these dicts of torch.nn.modules.module, mutated in place.
_torch_module = torch.nn.modules.module


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear (or subclass such as NonDynamicallyQuantizableLinear) whose class computes F.linear."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D itself (GPT-2's projections: weight stored (in, out)), not a subclass with its own forward."""
    return is_conv1d(m) and type(m).forward is sys.modules["transformers.pytorch_utils"].Conv1D.forward


def _is_linear4bit(m: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (or subclass) whose class computes Linear4bit's forward. bitsandbytes is not
    imported for it."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return (bnb_nn is not None and isinstance(m, bnb_nn.Linear4bit)
            and type(m).forward is bnb_nn.Linear4bit.forward)


def _peft_linear4bit():
    """PEFT's lora.bnb.Linear4bit, or None when bitsandbytes (or PEFT's bnb support) is not installed."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _served_adapter(layer: PeftLoraLinear):
    """(adapter, None) when the kernels can run `layer`'s active adapter, else (None, why not).

    Structural reasons only (they do not depend on the input); fuse_peft_model reports them as skips.
    """
    # PEFT's forward skips active adapters the layer has no weights for (adapters that target other modules).
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        if not active:
            return None, f"no LoRA weights for the active adapters {list(layer.active_adapters)}"
        return None, f"{len(active)} active adapters {active} (the kernels compute one)"
    adapter = active[0]
    reason = _adapter_unservable_reason(layer, adapter)
    return (None, reason) if reason is not None else (adapter, None)


def _fuse_time_reason(layer: PeftLoraLinear) -> Optional[str]:
    """Why fuse_peft_model leaves `layer` on PEFT's path, or None.

    Judged for the active adapters; a layer that holds none of them (they target other modules) is fused when one
    of its own adapters is servable, so that a later set_adapter to that adapter runs on the kernels.
    """
    _, reason = _served_adapter(layer)
    if reason is None or any(a in layer.lora_A for a in layer.active_adapters):
        return reason
    if any(_adapter_unservable_reason(layer, a) is None for a in layer.lora_A):
        return None
    return reason


def _adapter_unservable_reason(layer: PeftLoraLinear, adapter: str) -> Optional[str]:
    """Why the kernels cannot compute `adapter` of `layer` (whatever the input), or None."""
    if is_dora(layer, adapter):
        reason = dora_unservable_reason(layer, adapter)
        if reason is not None:
            return reason
    # base_layer itself, not get_base_layer(): a wrapped tuner layer in between would add its own delta.
    base = layer.base_layer
    linear4bit = _peft_linear4bit()
    if linear4bit is not None and isinstance(layer, linear4bit):
        if not _is_linear4bit(base):
            return (f"base layer is a {type(base).__module__}.{type(base).__name__}, not a bitsandbytes Linear4bit "
                    "running its own forward")
    elif getattr(layer, "fan_in_fan_out", False) != _is_conv1d(base):
        return (f"fan_in_fan_out={getattr(layer, 'fan_in_fan_out', False)} over a "
                f"{type(base).__module__}.{type(base).__name__}")
    elif not (_is_linear(base) or _is_conv1d(base)):
        return f"base layer is a {type(base).__module__}.{type(base).__name__}, not an nn.Linear or a Conv1D"
    for what, m in (("lora_A", layer.lora_A[adapter]), ("lora_B", layer.lora_B[adapter])):
        if not _is_linear(m):
            return f"{what}[{adapter!r}] is a {type(m).__module__}.{type(m).__name__}, not an nn.Linear"
    if layer.lora_A[adapter].bias is not None:
        return f"lora_A[{adapter!r}] has a bias"
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout module is a {type(dropout).__name__}"
    return None


def _call_plan(layer: PeftLoraLinear, x: torch.Tensor):
    """(adapter, None) when the kernels compute what PEFT's forward would for this call on `x`, else
    (None, why PEFT's forward must run)."""
    adapter, reason = _served_adapter(layer)
    if reason is not None:
        return None, reason
    reason = _call_reason(layer, x, adapter)
    return (None, reason) if reason is not None else (adapter, None)


def _call_reason(layer: PeftLoraLinear, x: torch.Tensor, adapter: str) -> Optional[str]:
    """Why the kernels cannot compute `adapter` of `layer` on this `x` (hooks, devices, dtypes), or None."""
    if (_torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks
            or _torch_module._global_backward_pre_hooks or _torch_module._global_backward_hooks):
        return "global module hooks are registered"
    base, lora_A, lora_B = layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter]
    for what, m in (("base_layer", base), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("lora_dropout", layer.lora_dropout[adapter])):
        hooked = hook_reason(m, x.device)
        if hooked is not None:
            return f"{what} has {hooked}"
    for what, t in (("base_layer.weight", base.weight), ("base_layer.bias", base.bias),
                    ("lora_A.weight", lora_A.weight), ("lora_B.weight", lora_B.weight), ("lora_B.bias", lora_B.bias)):
        if t is not None and t.device != x.device:
            return f"{what} is on {t.device}, x on {x.device}"
    if not getattr(layer, "cast_input_dtype_enabled", True) and (lora_A.weight.dtype != x.dtype
                                                                 or lora_B.weight.dtype != x.dtype):
        return "cast_input_dtype_enabled=False and x's dtype differs from the adapter's"
    return dora_call_reason(layer, x, adapter) if is_dora(layer, adapter) else None


BASE = "__base__"  # PEFT's name for a base-model sample in adapter_names
_last_segments: List = [None, None]  # (names tuple, AdapterSegments) of the last mixed batch: shared by its layers


def _mixed_segments(names) -> AdapterSegments:
    """The AdapterSegments of a names list, numbering the adapters in sorted order (the same for every layer)."""
    key = tuple(names)
    if _last_segments[0] != key:
        order = sorted({n for n in key if n != BASE})
        _last_segments[:] = [key, AdapterSegments.from_names([None if n == BASE else n for n in key], order)]
    return _last_segments[1]


def _mixed_forward(layer: PeftLoraLinear, x: torch.Tensor, names) -> Optional[torch.Tensor]:
    """PEFT's mixed batch on the segmented kernels, or None when PEFT's own _mixed_batch_forward must run."""
    if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)):
        return None
    if x.dim() < 2 or x.shape[0] != len(names) or (_torch_module._global_forward_pre_hooks
                                                   or _torch_module._global_forward_hooks
                                                   or _torch_module._global_backward_pre_hooks
                                                   or _torch_module._global_backward_hooks):
        return None
    segments = _mixed_segments(names)
    order = sorted({n for n in names if n != BASE})
    As, Bs, scalings, ps = [], [], [], []
    for adapter in order:
        if adapter not in layer.lora_A:  # PEFT: rows of an adapter the layer lacks get the base output
            As.append(None), Bs.append(None), scalings.append(1.0), ps.append(0.0)
            continue
        if (is_dora(layer, adapter) or _adapter_unservable_reason(layer, adapter) is not None
                or _call_reason(layer, x, adapter) is not None or layer.lora_B[adapter].bias is not None):
            return None
        dropout = layer.lora_dropout[adapter]
        As.append(layer.lora_A[adapter].weight), Bs.append(layer.lora_B[adapter].weight)
        scalings.append(layer.scaling[adapter])
        ps.append(dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0)
    base = layer.base_layer
    if hook_reason(base, x.device) is not None or any(t is not None and t.device != x.device
                                                  for t in (base.weight, base.bias)):
        return None
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    return fused_multi_lora_linear(x, weight, base.bias, As, Bs, scalings, ps, segments, training=True)


class FusedPeftLinear(PeftLoraLinear):
    """A peft.tuners.lora.Linear whose forward runs on lora_kernels when it can (never constructed directly)."""

    def forward(self, x, *args, **kwargs):
        if (not args and list(kwargs) == ["adapter_names"] and kwargs["adapter_names"] is not None
                and not self.disable_adapters and not self.merged):
            out = _mixed_forward(self, x, kwargs["adapter_names"])
            if out is not None:
                return out
        if args or kwargs or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        adapter, reason = _call_plan(self, x)
        if reason is not None:
            return super().forward(x, *args, **kwargs)
        if is_dora(self, adapter):
            return dora_forward(self, x, adapter)
        base = self.base_layer
        lora_B = self.lora_B[adapter]
        scaling = self.scaling[adapter]
        bias = base.bias
        if lora_B.bias is not None:
            # PEFT's lora_bias: lora_B adds scaling·b_B to the output, a constant per output feature.
            extra = (lora_B.bias * scaling).to(x.dtype if bias is None else bias.dtype)
            bias = extra if bias is None else bias + extra
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        # dropout.training, not self.training: PEFT's nn.Dropout decides by its own mode.
        # A Conv1D base (fan_in_fan_out) stores W as (in, out): its transposed view, no copy.
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        return fused_lora_linear(x, weight, bias, self.lora_A[adapter].weight, lora_B.weight,
                                 scaling, dropout_p=p, training=dropout.training)

    def _get_name(self) -> str:
        # nn.Module's repr prints this; PEFT's get_layer_status takes the layer type from the repr.
        return PeftLoraLinear.__name__

    def extra_repr(self) -> str:
        return "fused=lora_kernels"


def _forward_4bit(self, x, *args, **kwargs):
    """FusedPeftLinear4bit.forward: PEFT's lora.bnb.Linear4bit forward on the kernels when the call allows it."""
    if args or kwargs or self.disable_adapters or self.merged:
        return super(FusedPeftLinear4bit, self).forward(x, *args, **kwargs)
    adapter, reason = _call_plan(self, x)
    if reason is not None:
        return super(FusedPeftLinear4bit, self).forward(x, *args, **kwargs)
    if is_dora(self, adapter):
        return dora_forward(self, x, adapter)
    base = self.base_layer
    lora_B = self.lora_B[adapter]
    scaling = self.scaling[adapter]
    # bnb's Linear4bit computes in its compute_dtype and returns x's dtype; so do we.
    dt = base.compute_dtype if base.compute_dtype is not None else x.dtype
    bias = None if base.bias is None else base.bias.to(dt)
    if lora_B.bias is not None:  # lora_bias, folded into the bias as for FusedPeftLinear
        extra = (lora_B.bias * scaling).to(dt)
        bias = extra if bias is None else bias + extra
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    y = fused_lora_linear(x.to(dt), _packed_weight(base), bias, self.lora_A[adapter].weight, lora_B.weight,
                          scaling, dropout_p=p, training=dropout.training)
    return y.to(x.dtype)


def _packed_weight(base):
    """The base's 4-bit W. Under FSDP2 the weight is, during forward, the all-gathered packed bytes as a plain tensor
    (fully_shard keeps neither Params4bit nor its quant_state); bitsandbytes keeps the quant state on the module."""
    has_state = getattr(base.weight, "quant_state", None) is not None
    return base.weight if has_state else from_bnb(base.weight, getattr(base, "quant_state", None))


def _fused_4bit_class():
    """FusedPeftLinear4bit, defined on first use (PEFT defines lora.bnb.Linear4bit only with bitsandbytes)."""
    global FusedPeftLinear4bit
    linear4bit = _peft_linear4bit()
    if FusedPeftLinear4bit is None and linear4bit is not None:
        FusedPeftLinear4bit = type("FusedPeftLinear4bit", (linear4bit,), {
            "__doc__": "A peft lora.bnb.Linear4bit whose forward runs on lora_kernels when it can.",
            "__module__": __name__,
            "forward": _forward_4bit,
            # PEFT's repr (and get_layer_status) show lora.Linear4bit.
            "_get_name": lambda self: linear4bit.__name__,
            "extra_repr": lambda self: "fused=lora_kernels",
        })
    return FusedPeftLinear4bit


FusedPeftLinear4bit = None


def _is_fused(module: nn.Module) -> bool:
    return isinstance(module, FusedPeftLinear) or (FusedPeftLinear4bit is not None
                                                   and isinstance(module, FusedPeftLinear4bit))


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

    Eligible: exactly peft.tuners.lora.Linear over an nn.Linear (subclasses that keep nn.Linear's forward too),
    or a transformers Conv1D (GPT-2, fan_in_fan_out), holding one of the active adapters (or none of them, and an
    adapter of its own it could serve); and PEFT's lora.bnb.Linear4bit over a bitsandbytes Linear4bit
    (QLoRA) under the same rules; DoRA adapters over either base too (integrations/peft_dora.py); and the outermost
    PEFT ParamWrapper over a transformers MoE experts module (target_parameters; integrations/peft_experts.py). A
    fused layer still falls back to PEFT's forward per call (see the module docstring). Others (conv, embedding,
    8-bit quantized, several active adapters) are
    left as they are and listed in the returned report's `skipped`. Undo with unfuse_peft_model.
    """
    if not isinstance(peft_model, nn.Module):
        raise ValueError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    report = FuseReport()
    linear4bit = _peft_linear4bit()
    inner = wrapped_by_param_wrappers(peft_model)
    for name, module in peft_model.named_modules():
        if _is_fused(module) or isinstance(module, FusedPeftExperts):
            report.fused.append(name)
            continue
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, ParamWrapper):  # target_parameters: the outermost wrapper serves its whole nest
            if id(module) not in inner:
                reason = static_reason(module)
                if reason is None:
                    module.__class__ = FusedPeftExperts
                    report.fused.append(name)
                else:
                    report.skipped[name] = reason
            continue
        is_4bit = linear4bit is not None and type(module) is linear4bit
        if type(module) is not PeftLoraLinear and not is_4bit:
            report.skipped[name] = f"{type(module).__module__}.{type(module).__name__} is not served by the kernels"
            continue
        reason = _fuse_time_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        module.__class__ = _fused_4bit_class() if is_4bit else FusedPeftLinear
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
        elif isinstance(module, FusedPeftExperts):
            module.__class__ = ParamWrapper
            names.append(name)
        elif FusedPeftLinear4bit is not None and isinstance(module, FusedPeftLinear4bit):
            module.__class__ = _peft_linear4bit()
            names.append(name)
    return names
