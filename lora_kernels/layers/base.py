"""LoraLayer: the adapter bookkeeping every layer type shares, so that a layer type adds only its math.

What lives here: adapters by name (each with its own rank, alpha, dropout), the active adapter, the per-row
adapters of a mixed batch (batch_adapters hands every layer one AdapterSegments), merge / unmerge / disable, and
the per-adapter trainability switch. Parameter names do not depend on the layer type: the first adapter's tensors
are attributes (`lora_A`, `lora_B`: a single-adapter model's names and checkpoints never change), each further
adapter's live in ParameterDicts named with an "s" (`lora_As[name]`, `lora_Bs[name]`), created with the second
adapter.

What a layer type supplies (layers/dense.py, layers/linear_4bit.py; registry.py maps base modules to them):

    adapter_tensor_names   the per-adapter parameters ("lora_A", "lora_B"; a DoRA layer adds its magnitude)
    peft_keys              their suffixes in PEFT's adapter files ("lora_A.weight", ...), same order
    _adapter_shapes(r)     their shapes for rank r
    _init_adapter(name, init_lora_weights)
    _base_output(x)        the base module's output (adapter off, merged, or not held)
    _adapter_output(x, name)              one adapter for the whole batch: the fused kernels
    _mixed_output(x, segments, names)     a mixed batch (only types with mixed_batches = True)
    _merge_rule(name, sign)               W <- W + sign·(the adapter's change to W)
    to_base()              the base module holding this layer's current weight and bias
    one_adapter_reason     None, or why this type holds a single adapter (then add_adapter and mixed batches raise)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..config import check_lora_args
from ..functional import AdapterSegments
from ..names import check_adapter_name  # noqa: F401  (the one rule; re-exported by layers)

DEFAULT_ADAPTER = "default"


def init_lora_pair(A: torch.Tensor, B: torch.Tensor, init_lora_weights: Union[bool, str], r: int) -> None:
    """PEFT's initialisation of one (A, B) pair: A kaiming-uniform(a=√5), or normal with std 1/r for "gaussian";
    B zero, so a new adapter leaves the output unchanged, or kaiming-uniform too for init_lora_weights=False
    (tests and debugging)."""
    if init_lora_weights == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


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


# The layer-type table (layers/registry.py) lists the layer types, so it sits above them; from_linear reaches it
# through this slot, which registry.py fills when it is imported (lora_kernels.layers imports it), instead of
# importing upwards.
_wrap_base: List[Callable[..., "LoraLayer"]] = []


def wrap_base(module: nn.Module, layer_class: Optional[type] = None, **adapter) -> "LoraLayer":
    """The LoRA layer the layer-type table picks for base `module` (registry.wrap)."""
    return _wrap_base[0](module, layer_class, **adapter)


class LoraLayer(nn.Module):
    """A base module with named LoRA adapters; see the module docstring for what a layer type adds."""

    adapter_tensor_names: Tuple[str, ...] = ()
    peft_keys: Tuple[str, ...] = ()
    mixed_batches = False
    one_adapter_reason: Optional[str] = None

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                    lora_dtype: Optional[torch.dtype] = None) -> "LoraLayer":
        """Wrap `linear` (an nn.Linear, a transformers Conv1D, a bitsandbytes Linear4bit) without copying: the new
        layer's weight and bias are linear's own Parameters. The layer type is the one layers/registry.py's table
        picks for `linear` (this class, if it is a subclass of that type).

        lora_dtype defaults to PEFT's choice: float32 adapters for a half-precision base, else the base dtype.
        """
        return wrap_base(linear, cls, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         init_lora_weights=init_lora_weights, lora_dtype=lora_dtype)

    def _init_adapters(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, factory) -> None:
        """The first adapter ("default" until rename_first_adapter), its tensors created with `factory`."""
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        for name, shape in zip(self.adapter_tensor_names, self._adapter_shapes(r)):
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
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

    # -- adapters by name --------------------------------------------------------------------------
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

    def adapter_param_names(self, adapter_name: str) -> Tuple[str, ...]:
        """The layer's own names of one adapter's tensors (`lora_A`, or `lora_As.<name>` for a further adapter),
        in adapter_tensor_names' order."""
        self._check_held(adapter_name)
        if adapter_name == self.adapter_name:
            return self.adapter_tensor_names
        return tuple(f"{t}s.{adapter_name}" for t in self.adapter_tensor_names)

    def adapter_params(self, adapter_name: str) -> Tuple[nn.Parameter, ...]:
        """One adapter's tensors, in adapter_tensor_names' order ((lora_A, lora_B) for a LoRA layer)."""
        self._check_held(adapter_name)
        if adapter_name == self.adapter_name:
            return tuple(getattr(self, t) for t in self.adapter_tensor_names)
        return tuple(getattr(self, f"{t}s")[adapter_name] for t in self.adapter_tensor_names)

    def peft_tensors(self, adapter_name: str) -> Dict[str, nn.Parameter]:
        """{suffix of the file key PEFT stores it under (`lora_A.weight`): tensor} for one adapter."""
        return dict(zip(self.peft_keys, self.adapter_params(adapter_name)))

    def peft_names(self, adapter_name: str) -> Dict[str, str]:
        """{suffix of the file key PEFT stores it under: the layer's own name of that tensor} for one adapter."""
        return dict(zip(self.peft_keys, self.adapter_param_names(adapter_name)))

    def _check_held(self, adapter_name: str) -> None:
        if adapter_name not in self._specs:
            raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of this layer; it holds "
                             f"{self.adapter_names}")

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True) -> None:
        """Add another adapter (its own rank, alpha, dropout) under lora_As[adapter_name] / lora_Bs[adapter_name],
        in the dtype and on the device of the first adapter."""
        if self.one_adapter_reason is not None:
            raise ValueError(f"cannot add adapter {adapter_name!r}: {self.one_adapter_reason}")
        check_adapter_name(adapter_name)
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        if adapter_name in self._specs:
            raise ValueError(f"adapter_name={adapter_name!r} is already an adapter of this layer")
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.add_adapter(): unmerge the layer first")
        first = getattr(self, self.adapter_tensor_names[0])
        factory = {"device": first.device, "dtype": first.dtype}
        for name, shape in zip(self.adapter_tensor_names, self._adapter_shapes(r)):
            if f"{name}s" not in self._modules:
                # Created with the second adapter only: a single-adapter layer's modules and repr stay as they were.
                setattr(self, f"{name}s", nn.ParameterDict())
            getattr(self, f"{name}s")[adapter_name] = nn.Parameter(torch.empty(shape, **factory))
        self._specs[adapter_name] = AdapterSpec(r, lora_alpha, float(lora_dropout), bool(use_rslora))
        self._init_adapter(adapter_name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        self._init_adapter(self.adapter_name, init_lora_weights)

    # -- trainability -------------------------------------------------------------------------------
    def set_adapter_trainable(self, adapter_name: str, flag: bool = True) -> None:
        """requires_grad of every tensor of one adapter."""
        for p in self.adapter_params(adapter_name):
            p.requires_grad_(flag)

    def adapter_trainable(self, adapter_name: str) -> bool:
        """Whether any tensor of the adapter trains."""
        return any(p.requires_grad for p in self.adapter_params(adapter_name))

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch is not None and self.adapter_enabled:
            return self._forward_mixed(x)
        if self.merged or not self.adapter_enabled or self.active_adapter not in self._specs:
            # PEFT: a layer that lacks the active adapter computes its base output.
            return self._base_output(x)
        return self._adapter_output(x, self.active_adapter)

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """One mixed batch: adapter i of the model's order is passed only if this layer holds it and some row
        uses it, so an adapter with no rows in the batch gets no gradient at all (None, not zeros)."""
        if self.one_adapter_reason is not None or not self.mixed_batches:
            raise ValueError(self.one_adapter_reason or f"{type(self).__name__} does not run mixed-adapter batches")
        if self.merged:
            raise RuntimeError("a mixed-adapter batch cannot run on a merged layer; unmerge it first")
        segments, model_order, used = self._batch
        names = [name if name in self._specs and name in used else None for name in model_order]
        try:
            return self._mixed_output(x, segments, names)
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

    # -- merge ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Merge the active adapter into the base weight (PEFT merges the active adapter) by the layer type's rule.
        A layer that lacks the active adapter has nothing to merge and stays as it is."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge(): the adapter is already merged")
        if self.active_adapter in self._specs:
            self._merge_rule(self.active_adapter, +1.0)
            self._merged_adapter = self.active_adapter
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter out of the base weight again (up to W's rounding)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge(): the adapter is not merged")
        if self._merged_adapter is not None:
            self._merge_rule(self._merged_adapter, -1.0)
        self._merged_adapter = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """The base module type computing what this layer computes (eval mode), holding its (merged) weight.

        Merges in place first if needed; the returned module owns the same weight and bias Parameters.
        """
        if not self.merged and self.adapter_enabled:
            self.merge()
        return self.to_base()

    # -- what a layer type supplies ------------------------------------------------------------------
    def _adapter_shapes(self, r: int) -> Tuple[Tuple[int, ...], ...]:
        raise NotImplementedError

    def _init_adapter(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        raise NotImplementedError

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _mixed_output(self, x: torch.Tensor, segments: AdapterSegments,
                      names: Sequence[Optional[str]]) -> torch.Tensor:
        raise NotImplementedError

    def _merge_rule(self, adapter_name: str, sign: float) -> None:
        raise NotImplementedError

    def to_base(self) -> nn.Module:
        raise NotImplementedError
