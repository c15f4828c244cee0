"""What calling a sub-module would run besides its class's forward: module hooks, a forward replaced on the
instance, accelerate's hooks (integrations/peft.py runs the kernels only when nothing else would run)."""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn


def _is_bound_class_forward(f, m: nn.Module) -> bool:
    return getattr(f, "__self__", None) is m and getattr(f, "__func__", None) is type(m).forward


def _accelerate_hook_is_identity(m: nn.Module, hook, device: torch.device) -> bool:
    """True for accelerate's AlignDevicesHook that neither offloads nor moves anything for an input on `device`.

    dispatch_model puts one on every sub-module, offloaded or not; for a module whose weights already live on the
    execution device it only sends x and the output to devices they are already on, so calling the weights
    directly computes the same thing. Anything else accelerate may hang there (offloading, SequentialHook, user
    ModelHooks) is not understood here.
    """
    hooks = sys.modules.get("accelerate.hooks")
    if hooks is None or type(hook) is not hooks.AlignDevicesHook or hook.offload or hook.no_grad:
        return False
    if hook.execution_device is not None and torch.device(hook.execution_device) != device:
        return False
    return _is_bound_class_forward(m.__dict__.get("_old_forward"), m)


def hook_reason(m: nn.Module, device: torch.device) -> Optional[str]:
    """Why calling `m` on an input on `device` would run more than its class's forward (hooks, a patched
    forward), or None."""
    if m._forward_pre_hooks or m._forward_hooks:
        return "forward hooks"
    if m._backward_pre_hooks or m._backward_hooks:
        return "backward hooks"
    d = m.__dict__
    hf_hook = d.get("_hf_hook")
    if hf_hook is not None:
        # accelerate's hook replaces m.forward with a wrapper around m._old_forward
        return None if _accelerate_hook_is_identity(m, hf_hook, device) else f"an accelerate {type(hf_hook).__name__}"
    f = d.get("forward")
    # remove_hook_from_module puts back the bound class method as an instance attribute: that one is harmless.
    if f is not None and not _is_bound_class_forward(f, m):
        return "a replaced forward"
    return None
