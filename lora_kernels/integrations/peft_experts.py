"""fuse_peft_model for PEFT's target_parameters: a nest of `lora.ParamWrapper`s over a transformers MoE experts
module runs on the grouped expert path (layers/experts.py's experts_forward) instead of PEFT's parametrization,
which rebuilds ΔW = B·A for every expert on every forward.

The outermost ParamWrapper of a nest gets its class switched to FusedPeftExperts (forward only; parameters, keys
and PEFT's methods stay PEFT's). A call runs on the grouped path only when it computes what PEFT's forward
would: no extra arguments, adapters enabled and unmerged, every wrapper of the nest holding exactly one active
adapter (the same one) with PEFT's Identity dropout and no lora_B bias, distinct parameters among gate_up_proj /
down_proj of an experts layout the layer runs, no parametrization already on the experts module, no hooks on any
module of the nest, every tensor on x's device. Otherwise PEFT's own forward runs for that call.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from peft.tuners.lora.layer import ParamWrapper

from ..layers import experts_layout
from ..layers.experts import EXPERT_PARAMS, experts_forward
from .module_hooks import hook_reason


def nest(wrapper: ParamWrapper) -> Tuple[List[ParamWrapper], nn.Module]:
    """(the ParamWrappers from outermost in, the experts module under them)."""
    levels, m = [], wrapper
    while isinstance(m, ParamWrapper):
        levels.append(m)
        m = m.base_layer
    return levels, m


def static_reason(wrapper: ParamWrapper) -> Optional[str]:
    """Why the nest under `wrapper` can never run on the grouped path (whatever the input), or None."""
    levels, experts = nest(wrapper)
    try:
        experts_layout(experts, type(experts).__name__)
    except ValueError as err:
        return str(err)
    names = [lv.parameter_name for lv in levels]
    if len(set(names)) != len(names) or not set(names) <= set(EXPERT_PARAMS):
        return f"parameters {names}: the grouped path adapts gate_up_proj / down_proj, each once"
    if hasattr(experts, "parametrizations"):
        return "the experts module already carries a parametrization"
    return None


def _call_adapter(wrapper: ParamWrapper, x: torch.Tensor) -> Tuple[Optional[str], Optional[str]]:
    """(adapter, None) when this call can run on the grouped path, else (None, why not)."""
    levels, experts = nest(wrapper)
    reason = static_reason(wrapper)
    if reason is not None:
        return None, reason
    adapters = set()
    for lv in levels:
        if lv.disable_adapters or lv.merged:
            return None, "adapters disabled or merged"
        active = [a for a in lv.active_adapters if a in lv.lora_A]
        if len(active) != 1:
            return None, f"{len(active)} active adapters on {lv.parameter_name}"
        a = active[0]
        adapters.add(a)
        if type(lv.lora_dropout[a]) is not nn.Identity or lv.lora_B[a].bias is not None:
            return None, f"adapter {a!r} has dropout or a lora_B bias"
        for m in (lv, lv.lora_A[a], lv.lora_B[a]):
            if hook_reason(m, x.device) is not None:
                return None, f"{lv.parameter_name}: {hook_reason(m, x.device)}"
        if any(t.device != x.device for t in (lv.lora_A[a].weight, lv.lora_B[a].weight)):
            return None, "an adapter tensor is not on x's device"
    if len(adapters) != 1:
        return None, f"the nest's wrappers have different active adapters {sorted(adapters)}"
    if hook_reason(experts, x.device) is not None:
        return None, f"experts module: {hook_reason(experts, x.device)}"
    if any(p.device != x.device for p in experts.parameters(recurse=False)):
        return None, "an expert weight is not on x's device"
    return adapters.pop(), None


class FusedPeftExperts(ParamWrapper):
    """The outermost PEFT ParamWrapper of an experts module, served on the grouped path when it can be."""

    def forward(self, x, *args, **kwargs):
        if len(args) != 2 or kwargs:
            return super().forward(x, *args, **kwargs)
        adapter, reason = _call_adapter(self, x)
        if reason is not None:
            return super().forward(x, *args, **kwargs)
        levels, experts = nest(self)
        adapters = {lv.parameter_name: (lv.lora_A[adapter].weight, lv.lora_B[adapter].weight, lv.scaling[adapter])
                    for lv in levels}
        return experts_forward(experts, x, args[0], args[1], adapters)

    def _get_name(self) -> str:
        return ParamWrapper.__name__  # PEFT's repr and get_layer_status

    def extra_repr(self) -> str:
        return "fused=lora_kernels"


def wrapped_by_param_wrappers(model: nn.Module) -> set:
    """ids of the modules some ParamWrapper of `model` wraps (the inner levels of each nest)."""
    return {id(m.base_layer) for m in model.modules() if isinstance(m, ParamWrapper)}
