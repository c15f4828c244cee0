"""Several named adapters on one model: which one whole batches use (set_adapter), and mixed batches where each
sample picks its own adapter (batch_adapters).

A mixed batch is described once per block by one AdapterSegments (the per-sample adapter ids in the model's
adapter order) that every FusedLoraLinear of the model receives, so rows are grouped once for the whole model,
not once per layer; each layer then runs fused_multi_lora_linear over the adapters it holds.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .functional import AdapterSegments
from .inject import ACTIVE_ATTR, check_adapter, lora_layers, model_adapters

BASE = "__base__"  # PEFT's name for a base-model row in adapter_names=; None means the same here
_WARNED_ATTR = "_lora_kernels_warned_frozen"  # the frozen adapters batch_adapters has warned about on this model


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the adapter every whole batch uses, as PEFT's set_adapter: its parameters train, the
    other adapters' are frozen and do not compute; layers that lack it compute their base output. In place;
    returns `model`. Unknown name: ValueError listing the model's adapters."""
    check_adapter(model, adapter_name)
    layers = lora_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"set_adapter: {len(merged)} layer(s) are merged (e.g. {merged[0]!r}); unmerge them "
                           "first, the merged weight belongs to the adapter that was active")
    for layer in layers.values():
        layer.active_adapter = adapter_name
        for name in layer.adapter_names:
            layer.set_adapter_trainable(name, name == adapter_name)
    object.__setattr__(model, ACTIVE_ATTR, adapter_name)
    return model


def _sample_names(model: nn.Module, names) -> List[Optional[str]]:
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"names must be a non-empty list with one adapter name (or None) per batch row, "
                         f"got {names!r}")
    out = []
    for name in names:
        if name is None or name == BASE:
            out.append(None)
        else:
            out.append(check_adapter(model, name))
    return out


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[Optional[str]]):
    """Within the block every forward of `model` is a mixed batch: row b of the batch uses adapter names[b]
    (None or "__base__": the base model only). Training and eval; gradients reach each adapter from its own
    rows only, and an adapter with no row gets none. len(names) must be the batch size of every forward in
    the block (generate(): one entry per sequence it runs, so repeat each entry num_beams /
    num_return_sequences times, as PEFT does). disable_adapter inside the block still gives the base output."""
    sample_names = _sample_names(model, names)
    order = model_adapters(model)
    segments = AdapterSegments.from_names(sample_names, order)  # once for the whole model
    used = {n for n in sample_names if n is not None}
    layers = list(lora_layers(model).values())
    dora = [name for name, layer in lora_layers(model).items() if getattr(layer, "use_dora", False)]
    if dora:
        raise ValueError(f"batch_adapters: mixed-adapter batches with DoRA adapters (use_dora=True) are not "
                         f"supported yet ({len(dora)} DoRA layer(s), e.g. {dora[0]!r}); run one adapter per batch "
                         "with set_adapter")
    if model.training and torch.is_grad_enabled():
        _warn_frozen(model, [n for n in order if n in used], layers)
    previous = [layer._batch for layer in layers]
    for layer in layers:
        layer.set_batch(segments, order, used)
    try:
        yield segments
    finally:
        for layer, batch in zip(layers, previous):
            layer._batch = batch


def _warn_frozen(model: nn.Module, used: List[str], layers) -> None:
    """Warn once per model and adapter when a training batch has rows of an adapter none of whose tensors train:
    those rows compute, but the adapter learns nothing from them. set_adapter freezes every adapter but the one
    it activates (as PEFT's does), so after set_adapter("a") a mixed batch of "a" and "b" trains "a" only."""
    warned = vars(model).setdefault(_WARNED_ATTR, set())
    frozen = [n for n in used if n not in warned
              and not any(layer.adapter_trainable(n) for layer in layers if n in layer.adapter_names)]
    if not frozen:
        return
    warned.update(frozen)
    warnings.warn(f"batch_adapters: adapter(s) {frozen} have rows in this training batch but no trainable "
                  "parameter, so they get no gradient (set_adapter(name) freezes every other adapter, as PEFT's "
                  "does). To train them too, make their parameters trainable again: "
                  "`layer.set_adapter_trainable(adapter, True)` for each layer in "
                  "lora_kernels.inject.lora_layers(model), or lora_kernels.set_trainable(model, '.*') for every "
                  "adapter of every layer", stacklevel=4)
