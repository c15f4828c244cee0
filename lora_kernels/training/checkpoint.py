"""Checkpoints: everything a resumed run needs to continue bit-for-bit, written atomically, the newest kept.

OUTPUT_DIR/checkpoints/step-NNNNNNN/ holds
    trainable.safetensors               the trainable tensors (full tensors, gathered under FSDP2)
    trainer_state.json + .safetensors   optimizer, scheduler, GradScaler, counters, world size, config
    adapter/                            the adapter in PEFT format, when the trainer has a save function
    rank<R>.json + .safetensors         rank R's RNG states (torch, numpy, python, CUDA) and data cursor:
                                        ranks draw different dropout seeds and read different rows, so
                                        each restores its own
Reading a checkpoint parses JSON and safetensors only (safe_state.py) and cannot run code. Checkpoints of
older versions (torch.save *.pt files, which can name any function to call on load) are refused, never read.

A resumed run continues bit-for-bit on CPU because dropout seeds come from torch's RNG (restored here)
and the data order is a pure function of (seed, epoch) and the cursor.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .distributed import barrier
from .safe_state import json_path, read_state, read_tensors, write_state, write_tensors

CHECKPOINT_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_STEM = "trainer_state"
STATE_FILE = json_path(STATE_STEM)
ADAPTER_SUBDIR = "adapter"
LEGACY_FILES = ("trainer_state.pt", "trainable.pt")  # torch.save files of older versions
_PREFIX, _TMP = "step-", ".tmp"
_NAME = re.compile(r"step-\d{7,}")


def rank_stem(rank: int) -> str:
    return f"rank{rank}"


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
    torch.manual_seed(seed % 2**64)  # seed + rank may pass 2**64 - 1


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
    # Only the names write_checkpoint makes (step-NNNNNNN), by step: a stray "step-9" is not the latest.
    steps = sorted((int(d[len(_PREFIX):]), d) for d in os.listdir(root) if _NAME.fullmatch(d))
    return [os.path.join(root, d) for _, d in steps]


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
        write_tensors(os.path.join(tmp, TRAINABLE_FILE), trainable)
        write_state(os.path.join(tmp, STATE_STEM), trainer_state)
    barrier(world)
    if save_adapter is not None:
        save_adapter(os.path.join(tmp, ADAPTER_SUBDIR))
    write_state(os.path.join(tmp, rank_stem(rank)), rank_state)
    barrier(world)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        prune_checkpoints(output_dir, keep)
    barrier(world)
    return path


def _refuse_legacy(path: str) -> None:
    """A checkpoint of an older version holds torch.save files; loading one runs whatever it names, so refuse."""
    legacy = [os.path.join(path, f) for f in LEGACY_FILES if os.path.isfile(os.path.join(path, f))]
    if legacy:
        raise ValueError(f"resume: {legacy[0]} is a torch.save checkpoint from an older lora_kernels; it is "
                         "not loaded, because loading such a file can run arbitrary code. Start a new run, or resume "
                         "from a checkpoint written by this version (trainer_state.json + .safetensors)")


def read_checkpoint(path: str, rank: int, world: int,
                    trainable_names: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """(trainable, trainer_state, this rank's rank_state) of a checkpoint written by write_checkpoint.

    Checks that it is one, that as many processes wrote it, and that it holds exactly `trainable_names`.
    Errors are ValueErrors naming the checkpoint file at fault.
    """
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        _refuse_legacy(path)
        raise ValueError(f"resume: {path!r} is not a checkpoint (no {STATE_FILE})")
    state = _read(lambda: read_state(os.path.join(path, STATE_STEM)))
    if not isinstance(state, dict) or not isinstance(state.get("world_size"), int):
        raise ValueError(f"resume: {os.path.join(path, STATE_FILE)} holds no trainer state (no world_size)")
    if state["world_size"] != world:
        raise ValueError(f"resume: checkpoint {path!r} was written by {state['world_size']} processes, "
                         f"this run has {world}")
    trainable = _read(lambda: read_tensors(os.path.join(path, TRAINABLE_FILE)))
    if sorted(trainable) != sorted(trainable_names):
        missing = sorted(set(trainable_names) - set(trainable))
        extra = sorted(set(trainable) - set(trainable_names))
        raise ValueError(f"resume: checkpoint {path!r} does not match the model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the model, --target-modules, "
                         "--r and --adapter names of the run that wrote it")
    _check_counters(state, os.path.join(path, STATE_FILE))
    mine = _read(lambda: read_state(os.path.join(path, rank_stem(rank))))
    _check_rank_state(mine, os.path.join(path, json_path(rank_stem(rank))))
    return trainable, state, mine


TRAINER_KEYS = ("optimizer", "scheduler", "scaler", "step", "skipped", "tokens_seen")


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_counters(state: dict, source: str) -> None:
    """A crafted or damaged trainer state fails here, naming the file and key, not deep inside torch."""
    missing = [k for k in TRAINER_KEYS if k not in state]
    if missing:
        raise ValueError(f"resume: {source}: the trainer state has no {', '.join(map(repr, missing))}")
    for key in ("step", "skipped", "tokens_seen"):
        if not _nonneg_int(state[key]):
            raise ValueError(f"resume: {source}: {key!r} must be an integer >= 0, got {state[key]!r}")
    for key in ("optimizer", "scheduler", "scaler"):
        if not isinstance(state[key], dict):
            raise ValueError(f"resume: {source}: {key!r} must be a state dict, got {type(state[key]).__name__}")


def _check_rank_state(mine, source: str) -> None:
    if not isinstance(mine, dict) or not isinstance(mine.get("rng"), dict) or not isinstance(mine.get("data"), dict):
        raise ValueError(f"resume: {source}: expected 'rng' and 'data' entries")
    for key in ("torch", "numpy", "python"):
        if key not in mine["rng"]:
            raise ValueError(f"resume: {source}: the RNG state has no {key!r}")
    cursors = mine["data"].values() if all(isinstance(v, dict) for v in mine["data"].values()) else [mine["data"]]
    for cursor in cursors:  # one cursor, or one per adapter (multi.py)
        for key in ("epoch", "pos"):
            if not isinstance(cursor, dict) or not _nonneg_int(cursor.get(key)):
                got = cursor.get(key) if isinstance(cursor, dict) else cursor
                raise ValueError(f"resume: {source}: the data cursor's {key!r} must be an integer >= 0, got {got!r}")


def checkpoint_step(path: str) -> int:
    """The step a checkpoint was written at, from its JSON alone (cheap: nothing else is read)."""
    source = os.path.join(path, STATE_FILE)
    if not os.path.isfile(source):
        _refuse_legacy(path)
        raise ValueError(f"resume: {path!r} is not a checkpoint (no {STATE_FILE})")
    try:
        with open(source, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"resume: {source}: not a lora_kernels state file ({type(err).__name__})") from None
    state = doc.get("state") if isinstance(doc, dict) else None
    step = state.get("step") if isinstance(state, dict) else None
    if not _nonneg_int(step):
        raise ValueError(f"resume: {source}: 'step' must be an integer >= 0, got {step!r}")
    return step


def _read(load: Callable):
    try:
        return load()
    except ValueError as err:
        raise ValueError(f"resume: {err}") from None
