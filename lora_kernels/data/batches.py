"""The order one process reads training rows in: an epoch-wise permutation, sliced per rank."""
from __future__ import annotations

from typing import Tuple

import torch

from .loader import PackedDataset


class ShardedBatches:
    """Micro-batches for one rank: each epoch is a permutation drawn from (seed, epoch), sliced per rank.

    The cursor (epoch, pos) is all the state there is, so resuming restores the order exactly without
    touching any global RNG.
    """

    def __init__(self, ds: PackedDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        per_rank = len(ds) // world
        if per_rank == 0:
            raise ValueError(f"the training set has {len(ds)} rows, fewer than the {world} processes; "
                             "use more data or a shorter --seq-len")
        self.ds, self.bs, self.seed, self.rank, self.world = ds, batch_size, seed, rank, world
        self.per_rank = per_rank
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 100003 + epoch) % 2**64)  # any 64-bit --seed
        perm = torch.randperm(len(self.ds), generator=g)[: self.per_rank * self.world]
        return perm[self.rank::self.world]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.pos >= self.per_rank:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.pos:self.pos + self.bs]
        self.pos += len(idx)
        return self.ds.input_ids[idx], self.ds.labels[idx]
