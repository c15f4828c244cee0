"""Nested training state as a JSON file plus a safetensors file: what a checkpoint holds, with no code in it.

Optimizer, scheduler and GradScaler state dicts and RNG states are trees of dicts, lists, tuples, numbers,
strings, tensors and numpy arrays. write_state(stem, tree) writes
    stem.json          the tree, each tensor replaced by {"__tensor__": key}
    stem.safetensors   the tensors under those keys
and read_state(stem) rebuilds the tree. Reading parses JSON and safetensors only, so a crafted checkpoint
cannot run code (torch.save files can: loading one may call any function the file names).

JSON alone would lose what resuming bit-exactly depends on, so those are tagged explicitly:
  tuples          {"__tuple__": [...]}            random.setstate wants tuples back, not lists
  non-str keys    {"__items__": [[key, value]]}   the optimizer's state is keyed by int parameter ids
  numpy arrays    {"__ndarray__": [...], "dtype"}  numpy's RNG key is a uint32 array
Floats go through Python's repr, which round-trips exactly; NaN and inf are written as JSON's common
NaN/Infinity extension.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np
import torch

FORMAT = "lora_kernels.state"
VERSION = 1
_TENSOR, _TUPLE, _ITEMS, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS, _NDARRAY)


def json_path(stem: str) -> str:
    return stem + ".json"


def tensors_path(stem: str) -> str:
    return stem + ".safetensors"


# -- tree <-> (JSON-able tree, tensors) ------------------------------------------------------------
def _encode(obj: Any, where: List[str], tensors: Dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        key = "/".join(where) or "tensor"
        if key in tensors:  # two paths that join to the same string ("a/b" + "c" vs "a" + "b/c")
            key = f"{key}#{len(tensors)}"
        # A contiguous CPU copy of its own: safetensors refuses views and tensors that share storage.
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, where + [str(i)], tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, where + [str(i)], tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, where + [k], tensors) for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, where + ["key"], tensors), _encode(v, where + [str(k)], tensors)]
                         for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} at {'/'.join(where) or 'the top'} in a checkpoint "
                    "(only dicts, lists, tuples, numbers, strings, None, tensors and numpy arrays)")


class _Malformed(Exception):
    """Raised inside _decode; read_state turns it into a ValueError naming the files."""


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        key = obj[_TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise _Malformed(f"refers to tensor {key!r}, which the .safetensors file does not hold")
        return tensors[key]
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj[_ITEMS]}
    if _NDARRAY in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":  # numbers only: an object array could hold anything
            raise _Malformed(f"array of dtype {dtype} (only bool, integer and float arrays are stored)")
        return np.array(obj[_NDARRAY], dtype=dtype)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return key if not isinstance(key, list) else tuple(key)


# -- files -----------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    # The checkpoint directory is renamed into place after this; without the data on disk first, a power
    # loss could leave a complete-looking checkpoint with empty files.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path,
              metadata={"format": FORMAT})
    _fsync(path)


def read_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; a ValueError naming the file if it is not one."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def write_state(stem: str, tree: Any) -> None:
    """stem.json + stem.safetensors holding `tree` (see the module docstring)."""
    tensors: Dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "version": VERSION, "state": _encode(tree, [], tensors)}
    write_tensors(tensors_path(stem), tensors)
    with open(json_path(stem), "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())


def read_state(stem: str) -> Any:
    """The tree write_state(stem, tree) wrote; ValueError naming the file for anything else."""
    source = json_path(stem)
    if not os.path.isfile(source):
        raise ValueError(f"{source} is missing")
    try:
        with open(source, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: not a lora_kernels state file (invalid JSON: {err})") from None
    except RecursionError:
        raise ValueError(f"{source}: not a lora_kernels state file (JSON nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise ValueError(f"{source}: not a lora_kernels state file (no \"format\": {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{source}: state format version {doc.get('version')!r}; this lora_kernels reads "
                         f"version {VERSION}")
    tensors = read_tensors(tensors_path(stem))
    try:
        return _decode(doc["state"], tensors)
    except _Malformed as err:
        raise ValueError(f"{source}: {err}") from None
    except (TypeError, KeyError, ValueError, RecursionError) as err:  # a malformed tag payload, e.g. {"__items__": 3}
        raise ValueError(f"{source}: malformed state ({type(err).__name__}: {err})") from None
