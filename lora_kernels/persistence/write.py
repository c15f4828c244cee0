"""Writing adapters: save_adapter / save_adapters, each folder's config and weights replaced together (a crash
leaves the old adapter or the new one, never a mix)."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..inject import model_adapters
from ..layers import DEFAULT_ADAPTER, check_adapter_name
from .keys import CONFIG_NAME, WEIGHTS_NAME, PathLike, adapter_config, adapter_tensors

STAGING = ".adapter-new"     # inside an existing adapter directory: the next adapter, complete, before the swap
PREVIOUS = ".adapter-old"    # the adapter being replaced, kept (hard links) until the new one is in place


def _write_files(directory: str, config_dict: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Write both files into `directory` (a fresh staging folder), flushed to disk."""
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _stage(parent: str, name: str, config_dict: dict, tensors: Dict[str, torch.Tensor]) -> str:
    """A new folder parent/name holding the complete adapter. os.mkdir applies the umask (mkdtemp would make
    it 0700, and a renamed-in adapter folder would keep that)."""
    staging = os.path.join(parent, name)
    shutil.rmtree(staging, ignore_errors=True)  # a crashed save's leftover
    os.mkdir(staging)
    try:
        _write_files(staging, config_dict, tensors)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _replace_in(path: str, config_dict: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Replace the adapter files in the existing directory `path` (which may hold other things: a run's
    checkpoints and metrics) so that adapter_config.json never sits beside the other adapter's weights.

    The config marks a complete adapter: it is removed before the weights change and put back after. A crash
    at any point leaves at `path` the old adapter, the new one, or weights without a config (load_adapter
    then says the config is missing); from the moment the old config is gone until the end, the complete
    old adapter is in path/.adapter-old.
    """
    config, weights = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    staging = _stage(path, STAGING, config_dict, tensors)
    previous = os.path.join(path, PREVIOUS)
    if os.path.isfile(config) and os.path.isfile(weights):
        # A complete old adapter: keep it aside. (Without one, a crashed earlier save may have left the
        # only complete old adapter in .adapter-old: leave that alone.)
        shutil.rmtree(previous, ignore_errors=True)
        os.mkdir(previous)
        _link_or_copy(weights, os.path.join(previous, WEIGHTS_NAME))
        _link_or_copy(config, os.path.join(previous, CONFIG_NAME))
        os.unlink(config)
    elif os.path.isfile(config):
        os.unlink(config)  # a config without weights describes nothing
    os.replace(os.path.join(staging, WEIGHTS_NAME), weights)
    os.replace(os.path.join(staging, CONFIG_NAME), config)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)


def save_adapter(model: nn.Module, path: PathLike, *, adapter_name: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None) -> None:
    """Write one adapter of the model to directory `path` in PEFT's format (PeftModel.from_pretrained reads it).

    adapter_name: which adapter; may be left out when the model has one. The keys are those of a
    single-adapter save (`base_model.model.<module>.lora_A.weight`), whatever the adapter's name.

    base_model_name_or_path and task_type (e.g. "CAUSAL_LM") go into adapter_config.json as PEFT writes them;
    the base path defaults to a transformers model's own `name_or_path`, when it has one.
    Config and weights are replaced together, never one without the other: a new directory is built as a
    sibling and renamed into place; in an existing directory see _replace_in. Folders get the umask's mode.
    """
    _save_one(model, path, adapter_name, base_model_name_or_path, task_type, None)


def _save_one(model: nn.Module, path: PathLike, adapter_name: Optional[str], base_model_name_or_path: Optional[str],
              task_type: Optional[str], state_dict: Optional[Dict[str, torch.Tensor]]) -> None:
    path = os.fspath(path)
    if not path:  # "" would put the staging folder in the working directory's parent
        raise ValueError("save_adapter: path is empty; give the folder to write the adapter to")
    config_dict = adapter_config(model, adapter_name).to_peft_dict()
    config_dict["base_model_name_or_path"] = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    config_dict["task_type"] = task_type
    tensors = adapter_tensors(model, adapter_name, state_dict)
    if os.path.isdir(path):
        _replace_in(path, config_dict, tensors)
        return
    if os.path.exists(path):
        raise ValueError(f"save_adapter: {path!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = _stage(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp", config_dict, tensors)
    try:
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def adapter_folder(directory: PathLike, adapter_name: str) -> str:
    """Where PeftModel.save_pretrained puts an adapter: "default" in `directory` itself, any other adapter in
    the subfolder `directory/<adapter_name>` (also when the model has no "default" adapter, or only one adapter)."""
    directory = os.fspath(directory)
    return directory if adapter_name == DEFAULT_ADAPTER else os.path.join(directory, check_adapter_name(adapter_name))


def save_adapters(model: nn.Module, directory: PathLike, *, base_model_name_or_path: Optional[str] = None,
                  task_type: Optional[str] = None,
                  state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, str]:
    """Write every adapter of the model in the layout of PEFT's save_pretrained (adapter_folder): the adapter
    "default" at `directory`, each other one in `directory/<name>`, each folder in save_adapter's format and
    replaced as save_adapter replaces one. PeftModel.from_pretrained(base, directory) reads "default";
    peft_model.load_adapter(directory/<name>, adapter_name=<name>) each other one. state_dict: take the tensors
    from it, by the model's own names (see adapter_tensors). Returns {adapter name: folder}."""
    names = model_adapters(model)
    if not names:
        raise ValueError(f"the model ({type(model).__name__}) has no LoRA layer to save; call inject_lora first")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    folders = {name: adapter_folder(directory, name) for name in names}
    for name, folder in folders.items():
        _save_one(model, folder, name, base_model_name_or_path, task_type, state_dict)
    return folders

