"""FusedLoraLinear: a drop-in for nn.Linear with a LoRA adapter running on the fused kernels.

The module only holds parameters and does init, merge and repr; the math is in functional.py.
Parameter names follow nn.Linear for the frozen base (`weight`, `bias`, so base checkpoints load
unchanged) and PEFT's tensor layouts for the adapter (`lora_A` is (r, in), `lora_B` is (out, r)).

GPT-2's projections are transformers' Conv1D, a linear layer whose weight is stored (in, out). Wrapped,
the layer keeps that weight as it is (fan_in_fan_out=True, PEFT's name for it) and hands the kernels its
transposed view: the launchers take any strides, so nothing is copied.

Several adapters on one layer (inject_lora with another adapter_name): the layer's first adapter keeps the
`lora_A` / `lora_B` Parameters, so a single-adapter model's names and checkpoints never change; each further
adapter lives in the ParameterDicts `lora_As[name]` / `lora_Bs[name]` (created when the second adapter comes).
`active_adapter` names the adapter whole batches use; inside batch_adapters the model hands every layer one
AdapterSegments and the layer runs fused_multi_lora_linear over its adapters in the model's adapter order.

FusedLoraLinear4bit (QLoRA, layer_4bit.py) is the same layer over a frozen bitsandbytes 4-bit base.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_lora_args
from .functional import AdapterSegments, fused_lora_linear, fused_multi_lora_linear
from .names import check_adapter_name as _check_name

DEFAULT_ADAPTER = "default"


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


def check_adapter_name(adapter_name) -> str:
    """names.check_adapter_name: the one rule (an adapter name becomes a folder when saved)."""
    return _check_name(adapter_name)


@dataclass(frozen=True)
class AdapterSpec:
    """The hyperparameters of one adapter of a layer."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


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
        if is_bnb_quantized(linear):  # a bitsandbytes 4-bit base: the 4-bit sibling (layer_4bit.py)
            from .layer_4bit import FusedLoraLinear4bit

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
        self.adapter_name = DEFAULT_ADAPTER  # the name of the adapter in lora_A / lora_B (inject_lora renames it)
        self.active_adapter = DEFAULT_ADAPTER
        self._specs: Dict[str, AdapterSpec] = {DEFAULT_ADAPTER: AdapterSpec(r, lora_alpha, float(lora_dropout),
                                                                            bool(use_rslora))}
        self._merged_adapter: Optional[str] = None
        # (segments, the model's adapter order, the adapters the batch uses): set by batch_adapters for a forward.
        self._batch: Optional[Tuple[AdapterSegments, Tuple[str, ...], frozenset]] = None
        self.reset_lora_parameters(init_lora_weights)

    # -- several adapters -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> List[str]:
        """The adapters this layer holds, the one in lora_A / lora_B first."""
        return list(self._specs)

    def rename_first_adapter(self, adapter_name: str) -> None:
        """Name the adapter held in lora_A / lora_B (inject_lora does this right after building the layer)."""
        check_adapter_name(adapter_name)
        if len(self._specs) != 1:
            raise RuntimeError("rename_first_adapter: the layer already holds several adapters")
        self._specs = {adapter_name: self._specs[self.adapter_name]}
        self.adapter_name = self.active_adapter = adapter_name

    def adapter_spec(self, adapter_name: str) -> AdapterSpec:
        self._check_held(adapter_name)
        if adapter_name == self.adapter_name:  # the layer's own attributes stay the truth for the first adapter
            return AdapterSpec(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora)
        return self._specs[adapter_name]

    def _scaling_dropout(self, adapter_name: str):
        """(scaling, dropout_p) of an adapter; the first one's scaling is self.scaling, which may be a tensor."""
        if adapter_name == self.adapter_name:
            return self.scaling, self.lora_dropout
        spec = self._specs[adapter_name]
        return spec.scaling, spec.lora_dropout

    def adapter_params(self, adapter_name: str) -> Tuple[nn.Parameter, nn.Parameter]:
        """(lora_A, lora_B) of one adapter of this layer."""
        self._check_held(adapter_name)
        if adapter_name == self.adapter_name:
            return self.lora_A, self.lora_B
        return self.lora_As[adapter_name], self.lora_Bs[adapter_name]

    def _check_held(self, adapter_name: str) -> None:
        if adapter_name not in self._specs:
            raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of this layer; it holds "
                             f"{self.adapter_names}")

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True) -> None:
        """Add another adapter (its own rank, alpha, dropout) under lora_As[adapter_name] / lora_Bs[adapter_name],
        in the dtype and on the device of the first adapter."""
        check_adapter_name(adapter_name)
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        if adapter_name in self._specs:
            raise ValueError(f"adapter_name={adapter_name!r} is already an adapter of this layer")
        if self.merged:
            raise RuntimeError("FusedLoraLinear.add_adapter(): unmerge the layer first")
        if "lora_As" not in self._modules:
            # Created with the second adapter only: a single-adapter layer's modules and repr stay as they were.
            self.lora_As, self.lora_Bs = nn.ParameterDict(), nn.ParameterDict()
        factory = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        self.lora_As[adapter_name] = nn.Parameter(torch.empty((r, self.in_features), **factory))
        self.lora_Bs[adapter_name] = nn.Parameter(torch.empty((self.out_features, r), **factory))
        self._specs[adapter_name] = AdapterSpec(r, lora_alpha, float(lora_dropout), bool(use_rslora))
        self._init_adapter(adapter_name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        self._init_adapter(self.adapter_name, init_lora_weights)

    @torch.no_grad()
    def _init_adapter(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        A, B = self.adapter_params(adapter_name)
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            # Non-zero B so the adapter changes the output (tests, debugging).
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    # -- forward ----------------------------------------------------------------------------------
    def linear_weight(self) -> torch.Tensor:
        """The base weight as (out_features, in_features): the Parameter itself, or a Conv1D weight's
        transposed view (no copy)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and self.adapter_enabled:
            return self._forward_mixed(x)
        if self.merged or not self.adapter_enabled or self.active_adapter not in self._specs:
            # PEFT: a layer that lacks the active adapter computes its base output.
            return F.linear(x, self.linear_weight(), self.bias)
        A, B = self.adapter_params(self.active_adapter)
        scaling, p = self._scaling_dropout(self.active_adapter)
        return fused_lora_linear(x, self.linear_weight(), self.bias, A, B, scaling, dropout_p=p,
                                 training=self.training)

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """One mixed batch: adapter i of the model's order is passed only if this layer holds it and some row
        uses it, so an adapter with no rows in the batch gets no gradient at all (None, not zeros)."""
        if self.merged:
            raise RuntimeError("a mixed-adapter batch cannot run on a merged layer; unmerge it first")
        segments, model_order, used = self._batch
        As, Bs, scalings, ps = [], [], [], []
        for name in model_order:
            if name in self._specs and name in used:
                A, B = self.adapter_params(name)
                scaling, p = self._scaling_dropout(name)
                As.append(A), Bs.append(B), scalings.append(scaling), ps.append(p)
            else:
                As.append(None), Bs.append(None), scalings.append(1.0), ps.append(0.0)
        try:
            return fused_multi_lora_linear(x, self.linear_weight(), self.bias, As, Bs, scalings, ps, segments,
                                           training=self.training)
        except ValueError as err:  # e.g. a names list whose length is not the batch size: say where it came from
            raise ValueError(f"batch_adapters() with {segments.batch} adapter names: {err}") from None

    def set_batch(self, segments: Optional[AdapterSegments], model_order: Sequence[str] = (),
                  used: Sequence[str] = ()) -> None:
        """Route the next forwards through one AdapterSegments (None: back to whole-batch mode)."""
        self._batch = None if segments is None else (segments, tuple(model_order), frozenset(used))

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
    def delta_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """scaling·B·A in float32, the change an adapter (default: the active one) makes to W, in W's layout."""
        name = self.active_adapter if adapter_name is None else adapter_name
        A, B = self.adapter_params(name)
        delta = (B.float() @ A.float()) * self._scaling_dropout(name)[0]
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + scaling·B·A of the active adapter (PEFT merges the active adapter), in float32, cast back to
        W's dtype. A layer that lacks the active adapter has nothing to merge and stays as it is."""
        if self.merged:
            raise RuntimeError("FusedLoraLinear.merge(): the adapter is already merged")
        if self.active_adapter in self._specs:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self._merged_adapter = self.active_adapter
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W - scaling·B·A of the merged adapter; restores the base weight up to W's dtype rounding."""
        if not self.merged:
            raise RuntimeError("FusedLoraLinear.unmerge(): the adapter is not merged")
        if self._merged_adapter is not None:
            self.weight.copy_((self.weight.float() - self.delta_weight(self._merged_adapter)).to(self.weight.dtype))
        self._merged_adapter = None
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
                f"{', fan_in_fan_out' if self.fan_in_fan_out else ''}{', merged' if self.merged else ''}"
                + (f", adapters={self.adapter_names}, active={self.active_adapter!r}" if len(self._specs) > 1 else ""))
