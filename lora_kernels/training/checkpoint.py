"""Checkpoints: everything a resumed run needs to continue bit-for-bit, written atomically, the newest kept.

OUTPUT_DIR/checkpoints/step-NNNNNNN/ holds
    trainable.pt        the trainable tensors (full tensors, gathered under FSDP2)
    trainer_state.pt    optimizer, scheduler, GradScaler, counters, world size, config
    adapter/            the adapter in PEFT format, when the trainer has a save function
    rank<R>.pt          rank R's RNG states and data cursor: ranks draw different dropout seeds and read
                        different rows, so each restores its own
A resumed run continues bit-for-bit on CPU because dropout seeds come from torch's RNG (restored here)
and the data order is a pure function of (seed, epoch) and the cursor.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .distributed import barrier

CHECKPOINT_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.pt"
STATE_FILE = "trainer_state.pt"
ADAPTER_SUBDIR = "adapter"
_PREFIX, _TMP = "step-", ".tmp"


# -- RNG -----------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- where checkpoints are -----------------------------------------------------------------------
def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"{_PREFIX}{step:07d}")


def list_checkpoints(output_dir: str) -> List[str]:
    """The complete checkpoints under output_dir, oldest first (the zero-padded step sorts by name)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(d for d in os.listdir(root) if d.startswith(_PREFIX) and not d.endswith(_TMP))
    return [os.path.join(root, d) for d in names]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints."""
    for path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# -- write and read ------------------------------------------------------------------------------
def write_checkpoint(output_dir: str, step: int, trainable: Dict[str, torch.Tensor], trainer_state: dict,
                     rank_state: dict, *, rank: int, world: int, keep: int,
                     save_adapter: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoints/step-<step> and prune to the newest `keep`; every rank calls it.

    Rank 0 writes trainable and trainer_state, each rank its rank_state; save_adapter(directory) runs on
    every rank, since under FSDP2 it gathers collectively. The directory is assembled under a .tmp name
    and renamed at the end: a checkpoint is either complete or absent.
    """
    path = checkpoint_path(output_dir, step)
    tmp = path + _TMP
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(trainable, os.path.join(tmp, TRAINABLE_FILE))
        torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    barrier(world)
    if save_adapter is not None:
        save_adapter(os.path.join(tmp, ADAPTER_SUBDIR))
    torch.save(rank_state, os.path.join(tmp, f"rank{rank}.pt"))
    barrier(world)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        prune_checkpoints(output_dir, keep)
    barrier(world)
    return path


def read_checkpoint(path: str, rank: int, world: int,
                    trainable_names: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """(trainable, trainer_state, this rank's rank_state) of a checkpoint written by write_checkpoint.

    Checks that it is one, that as many processes wrote it, and that it holds exactly `trainable_names`.
    """
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ValueError(f"resume: {path!r} is not a checkpoint (no {STATE_FILE})")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if state["world_size"] != world:
        raise ValueError(f"resume: checkpoint {path!r} was written by {state['world_size']} processes, "
                         f"this run has {world}")
    trainable = torch.load(os.path.join(path, TRAINABLE_FILE), map_location="cpu")
    if sorted(trainable) != sorted(trainable_names):
        missing = sorted(set(trainable_names) - set(trainable))
        extra = sorted(set(trainable) - set(trainable_names))
        raise ValueError(f"resume: checkpoint {path!r} does not match the model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    mine = torch.load(os.path.join(path, f"rank{rank}.pt"), map_location="cpu", weights_only=False)
    return trainable, state, mine
