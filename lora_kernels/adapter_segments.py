"""AdapterSegments: which adapter each sample of a mixed batch uses, and the per-row tables and row order the
segmented kernels read, built once per forward and shared by every layer (fused_multi_lora_linear in
functional.py takes it)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backends.base import host_to_device


class AdapterSegments:
    """Which adapter each sample of a mixed batch uses (None = base model only): built once per forward from
    the per-sample list and handed, the same object, to every layer.

        segments = AdapterSegments.from_names(["a", "b", None, "a"], adapter_names=["a", "b"])
        y = fused_multi_lora_linear(x, W, b, [A_a, A_b], [B_a, B_b], [s_a, s_b], [p_a, p_b], segments)

    The kernels want one int32 adapter id per logical row of a layer's input, in that layer's own numbering
    of its adapters (a layer may hold only some of the model's adapters), and the order their row tiles walk:
    the logical rows sorted by adapter (row_order). The per-sample list lives here on the host; each distinct
    (row count, layer adapter set, device) costs one small host-to-device copy per forward (from pinned memory,
    without blocking the host: ops/transfer.py), cached here, so all
    layers that see the same rows and hold the same adapters share one tensor, and nothing is ever read back
    from the device. The order depends on the row count and device only: computed once per forward, it serves
    every layer (a layer's slots keep the model's adapter order). Rows are batch-major: sample b owns rows
    b·T .. (b+1)·T - 1 of x's logical rows, T = rows / batch (x of shape (batch, ...)); generate()'s one-token
    steps are T = 1.
    """

    def __init__(self, sample_adapters: Sequence[Optional[int]]):
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
        self.max_index = max(ids)  # the largest adapter index any sample uses (-1 when all are base only)
        # The same list as a tensor: the per-row ids are computed from it with tensor ops, so torch.compile
        # sees an input rather than constants and does not recompile for every new mix of adapters.
        self.sample_ids = torch.tensor(ids, dtype=torch.int32)
        self._row_ids: Dict[Tuple[int, Tuple[int, ...], torch.device], torch.Tensor] = {}
        self._row_orders: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._pinned: List[torch.Tensor] = []  # the copies' host sources, re-read by a CUDA graph that captured them

    @classmethod
    def from_names(cls, names: Sequence[Optional[str]], adapter_names: Sequence[str]):
        """From one adapter name (or None) per sample; indices follow adapter_names' order."""
        index = {name: i for i, name in enumerate(adapter_names)}
        for name in names:
            if name is not None and name not in index:
                raise ValueError(f"unknown adapter {name!r}; the adapters are {list(adapter_names)}")
        return cls([None if name is None else index[name] for name in names])

    @property
    def batch(self) -> int:
        return len(self.sample_adapters)

    def rows_per_sample(self, num_rows: int) -> int:
        if num_rows % self.batch != 0:
            raise ValueError(f"the segments describe {self.batch} samples but the input has {num_rows} rows, "
                             f"not a multiple of {self.batch}")
        return num_rows // self.batch

    def row_adapter(self, num_rows: int, device="cpu", slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(num_rows,) int32 on `device`: each row's adapter, renumbered through `slots` (slots[i] = the
        layer's own index of model adapter i, -1 where the layer lacks it); -1 = base only."""
        slots = tuple(slots) if slots is not None else tuple(range(self.max_index + 1))
        key = (num_rows, slots, torch.device(device))
        ids = self._row_ids.get(key)
        if ids is None:
            # slot_of[a] = the layer's slot of model adapter a; the appended -1 is what base samples (-1) index.
            slot_of = torch.tensor([*slots, -1], dtype=torch.int32)
            ids = host_to_device(slot_of[self.sample_ids.long()], device, self._pinned)
            ids = ids.repeat_interleave(self.rows_per_sample(num_rows))
            self._row_ids[key] = ids
        return ids

    def row_order(self, num_rows: int, device="cpu") -> torch.Tensor:
        """(num_rows,) int32 on `device`: the logical rows sorted by adapter index, base-only rows first, each
        adapter's rows in their batch order (a stable sort), so a row tile that walks it holds one adapter's
        rows, or those of the few adapters whose runs meet inside it. Sorted by the model's numbering, which every layer's slots keep."""
        key = (num_rows, torch.device(device))
        order = self._row_orders.get(key)
        if order is None:
            T = self.rows_per_sample(num_rows)
            # Sorting the samples sorts the rows (a sample's rows share its adapter); tensor ops, like row_adapter,
            # so torch.compile sees the ids as an input.
            samples = host_to_device(torch.sort(self.sample_ids, stable=True).indices.to(torch.int32), device,
                                     self._pinned)
            order = (samples[:, None] * T + torch.arange(T, dtype=torch.int32, device=device)).reshape(-1)
            self._row_orders[key] = order
        return order

    def __repr__(self) -> str:
        return f"AdapterSegments({list(a if a >= 0 else None for a in self.sample_adapters)})"
