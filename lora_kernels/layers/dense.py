"""FusedLoraLinear: a drop-in for nn.Linear with LoRA adapters running on the fused kernels.

The layer type holds parameters and does init, merge and repr; the math is in functional.py, the adapter
bookkeeping (names, active adapter, mixed batches, merge/unmerge, disable) in base.py. Parameter names follow
nn.Linear for the frozen base (`weight`, `bias`, so base checkpoints load unchanged) and PEFT's tensor layouts for
the adapter (`lora_A` is (r, in), `lora_B` is (out, r)).

GPT-2's projections are transformers' Conv1D, a linear layer whose weight is stored (in, out). Wrapped,
the layer keeps that weight as it is (fan_in_fan_out=True, PEFT's name for it) and hands the kernels its
transposed view: the launchers take any strides, so nothing is copied.

Several adapters on one layer (inject_lora with another adapter_name): see base.py. Inside batch_adapters the
layer runs fused_multi_lora_linear over its adapters in the model's adapter order.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import AdapterSegments, fused_lora_linear, fused_multi_lora_linear
from .base import LoraLayer, init_lora_pair


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


class FusedLoraLinear(LoraLayer):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with W, b frozen and A, B trainable.

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. init_lora_weights follows PEFT:
    True = A kaiming-uniform(a=√5), B zeros (the layer starts equal to its base); "gaussian" = A ~ N(0, 1/r),
    B zeros; False = both random (a non-identity adapter, for tests).
    """

    adapter_tensor_names = ("lora_A", "lora_B")
    peft_keys = ("lora_A.weight", "lora_B.weight")
    mixed_batches = True

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
    def from_base(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                  use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                  lora_dtype: Optional[torch.dtype] = None) -> "FusedLoraLinear":
        """The layer over an nn.Linear or a transformers Conv1D (the layer-type table's rows for them)."""
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
        factory = {"device": weight.device, "dtype": lora_dtype if lora_dtype is not None else weight.dtype}
        self._init_adapters(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, factory)

    def _adapter_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    @torch.no_grad()
    def _init_adapter(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        A, B = self.adapter_params(adapter_name)[:2]  # a DoRA layer adds its magnitude
        init_lora_pair(A, B, init_lora_weights, A.shape[0])

    # -- forward ----------------------------------------------------------------------------------
    def linear_weight(self) -> torch.Tensor:
        """The base weight as (out_features, in_features): the Parameter itself, or a Conv1D weight's
        transposed view (no copy)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear_weight(), self.bias)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        A, B = self.adapter_params(adapter_name)
        scaling, p = self._scaling_dropout(adapter_name)
        return fused_lora_linear(x, self.linear_weight(), self.bias, A, B, scaling, dropout_p=p,
                                 training=self.training)

    def _mixed_output(self, x: torch.Tensor, segments: AdapterSegments,
                      names: Sequence[Optional[str]]) -> torch.Tensor:
        As, Bs, scalings, ps = [], [], [], []
        for name in names:
            if name is not None:
                A, B = self.adapter_params(name)
                scaling, p = self._scaling_dropout(name)
                As.append(A), Bs.append(B), scalings.append(scaling), ps.append(p)
            else:
                As.append(None), Bs.append(None), scalings.append(1.0), ps.append(0.0)
        return fused_multi_lora_linear(x, self.linear_weight(), self.bias, As, Bs, scalings, ps, segments,
                                       training=self.training)

    # -- merge ------------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """scaling·B·A in float32, the change an adapter (default: the active one) makes to W, in W's layout."""
        name = self.active_adapter if adapter_name is None else adapter_name
        A, B = self.adapter_params(name)[:2]
        delta = (B.float() @ A.float()) * self._scaling_dropout(name)[0]
        return delta.t() if self.fan_in_fan_out else delta

    def _merge_rule(self, adapter_name: str, sign: float) -> None:
        """W ← W ± scaling·B·A in float32, cast back to W's dtype."""
        w, delta = self.weight.float(), self.delta_weight(adapter_name)
        self.weight.copy_((w + delta if sign > 0 else w - delta).to(self.weight.dtype))

    def to_base(self) -> nn.Module:
        """The base layer type (nn.Linear, or Conv1D) owning this layer's (current) weight and bias Parameters."""
        return linear_sharing(self.weight, self.bias, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"scaling={self.scaling:g}{', rslora' if self.use_rslora else ''}"
                f"{', fan_in_fan_out' if self.fan_in_fan_out else ''}{', merged' if self.merged else ''}"
                + (f", adapters={self.adapter_names}, active={self.active_adapter!r}" if len(self._specs) > 1 else ""))
