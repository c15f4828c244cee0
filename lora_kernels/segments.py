"""AdapterSegments: which adapter each sample of a mixed batch uses, built once per forward for the whole model.

A mixed batch gives each sample (row of the batch dimension) one adapter, or none (base model only). The
kernels want one int32 adapter id per logical row of a layer's input, in that layer's own numbering of its
adapters (a layer may hold only some of the model's adapters). This object holds the per-sample list once,
on the host, and derives those per-row tensors on demand:

    segments = AdapterSegments.from_names(["a", "b", None, "a"], adapter_names=["a", "b"], device=x.device)
    y = fused_multi_lora_linear(x, W, b, [A_a, A_b], [B_a, B_b], [s_a, s_b], [p_a, p_b], segments)

Each distinct (row count, layer adapter set) costs one small host-to-device copy per forward, cached here,
so all layers of a transformer that see the same (batch, seq) rows and hold the same adapters share one
tensor; nothing is ever read back from the device. Rows are batch-major: sample b owns rows
b·T .. (b+1)·T - 1 of x's logical rows, T = rows / batch (x of shape (batch, ...)); generate()'s one-token
steps are T = 1.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch


class AdapterSegments:
    """Per-sample adapter indices (None = base) of one forward; hand the same object to every layer."""

    def __init__(self, sample_adapters: Sequence[Optional[int]], device=None):
        ids = []
        for i, a in enumerate(sample_adapters):
            if a is None:
                ids.append(-1)
            elif isinstance(a, int) and not isinstance(a, bool) and a >= 0:
                ids.append(a)
            else:
                raise ValueError(f"sample_adapters[{i}] must be an adapter index >= 0 or None, got {a!r}")
        if not ids:
            raise ValueError("sample_adapters is empty: give one entry (adapter index or None) per sample")
        self.sample_adapters: Tuple[int, ...] = tuple(ids)  # -1 = base only
        self.device = torch.device("cpu" if device is None else device)
        self._row_ids: Dict[Tuple[int, Tuple[int, ...]], torch.Tensor] = {}

    @classmethod
    def from_names(cls, names: Sequence[Optional[str]], adapter_names: Sequence[str], device=None):
        """From one adapter name (or None) per sample; indices follow adapter_names' order."""
        index = {name: i for i, name in enumerate(adapter_names)}
        for name in names:
            if name is not None and name not in index:
                raise ValueError(f"unknown adapter {name!r}; the adapters are {list(adapter_names)}")
        return cls([None if name is None else index[name] for name in names], device)

    @property
    def batch(self) -> int:
        return len(self.sample_adapters)

    @property
    def max_index(self) -> int:
        """The largest adapter index any sample uses (-1 when every sample is base only)."""
        return max(self.sample_adapters)

    def rows_per_sample(self, num_rows: int) -> int:
        if num_rows % self.batch != 0:
            raise ValueError(f"the segments describe {self.batch} samples but the input has {num_rows} rows, "
                             f"not a multiple of {self.batch}")
        return num_rows // self.batch

    def row_adapter(self, num_rows: int, slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(num_rows,) int32 on self.device: each row's adapter, renumbered through `slots` (slots[i] = the
        layer's own index of model adapter i, -1 where the layer lacks it); -1 = base only."""
        slots = tuple(slots) if slots is not None else tuple(range(self.max_index + 1))
        key = (num_rows, slots)
        ids = self._row_ids.get(key)
        if ids is None:
            per_sample = [slots[a] if 0 <= a < len(slots) else -1 for a in self.sample_adapters]
            ids = torch.tensor(per_sample, dtype=torch.int32).to(self.device, non_blocking=True)
            ids = ids.repeat_interleave(self.rows_per_sample(num_rows))
            self._row_ids[key] = ids
        return ids

    def __repr__(self) -> str:
        return f"AdapterSegments({list(a if a >= 0 else None for a in self.sample_adapters)})"
