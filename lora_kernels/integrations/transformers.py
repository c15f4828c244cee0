"""transformers integration: one-call LoRA for any PreTrainedModel, adapter-only checkpoints under plain Trainer.

    model = apply_fused_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer = Trainer(model=model, args=TrainingArguments(..., save_steps=500))
    trainer.train()                              # checkpoint-N/ holds the adapters (PEFT format), not the model
    trainer.train(resume_from_checkpoint=True)   # adapters, optimizer, scheduler, RNG and step restored

How Trainer is made to checkpoint the adapter only (and why this way)
---------------------------------------------------------------------
Trainer writes a checkpoint with `model.save_pretrained(dir)` and reads one back in `_load_from_checkpoint`. For a
`peft.PeftModel` both ends are PEFT's: save_pretrained writes adapter_config.json + adapter_model.safetensors, and
`_load_from_checkpoint` recognises the model with `isinstance(model, PeftModel)` and calls `model.load_adapter`.
Our model is the user's own PreTrainedModel class, so that isinstance test cannot hold without pretending to be a
PeftModel (PeftModel's attribute forwarding, `peft_config`, `disable_adapter` and more, which TRL and accelerate
would then call). transformers' other route, its PeftAdapterMixin (`_hf_peft_config_loaded`), covers saving only:
on resume such a model falls through to the sharded-checkpoint loader and fails for want of an index
(huggingface/transformers#29607). So `enable_adapter_checkpoints` uses the two hooks Trainer already calls on
any PreTrainedModel, both on this one model instance (never on the class, never on transformers):

- save: `model.save_pretrained` is replaced on the instance by one that writes every adapter as
  PeftModel.save_pretrained does (`persistence.save_adapters`): the adapter "default" at the directory's root,
  any other adapter in a subfolder named after it (also with no "default", as PEFT), each loadable with
  PeftModel.from_pretrained or load_adapter; plus `model.safetensors.index.json` naming the files that hold the
  adapters' tensors. Once no LoRA layer is left (merge_and_unload / unload), it is transformers' own
  save_pretrained again: the full model.
- resume: with no model.safetensors in the checkpoint, `_load_from_checkpoint` reads that index with
  `load_sharded_checkpoint(model, dir, strict=False)`, which calls `model.load_state_dict(<file>)` per file it
  names. A load_state_dict pre-hook on the model renames PEFT's keys (`base_model.model.<path>.lora_A.weight`) to
  the model's own names of the "default" adapter (`<path>.lora_A`; of the only adapter, in a one-adapter model);
  a PEFT key that names nothing in the model is an error, never silently dropped. PEFT's key names no adapter,
  so the other adapters' subfolder files cannot be told apart by load_state_dict: their tensors are written a
  second time, under the model's own names (`<path>.lora_As.<name>`), to `named_adapters.safetensors` at the
  root, which the index points them at (the price: those adapters take twice their size on disk; PeftModel
  itself is resumed by Trainer from the subfolders, a path only a PeftModel gets).
  Trainer then restores optimizer, scheduler, RNG states and the step from the checkpoint as for any model.
  (Trainer logs that the frozen base weights are missing from the checkpoint: they are, by design; the base
  comes from the model you built.)

`apply_fused_lora` and `lora_kernels.inject_lora` on a PreTrainedModel both install the hooks (inject_lora calls
`enable_adapter_checkpoints` when the model is a PreTrainedModel). `AdapterCheckpointCallback` predates them; it
still works (it writes the same adapter files again) and is still what a plain nn.Module trained with Trainer
needs, since Trainer saves such a module with a bare state dict, not save_pretrained.
Not covered: `load_best_model_at_end=True`. Trainer's best-model loader, seeing adapter files in a model that is
not a PeftModel, reads model.safetensors or pytorch_model.bin and fails at the end of training (transformers' own
PeftAdapterMixin adapters fail the same way). `disable_adapter_checkpoints(model)` goes back to full-model
checkpoints for such runs; a PEFT model passed through fuse_peft_model has both.

Mixed batches of several adapters under Trainer (docs/peft_transformers.md, "Trainer: adapter-only checkpoints and
resume"): a data collator keeps each row's adapter name, a Trainer subclass runs compute_loss inside `batch_adapters`,
and TrainingArguments(remove_unused_columns=False) keeps the names column; checkpoints and resume are as above.

Gradient checkpointing needs nothing special: the dropout seed is drawn from torch's RNG at forward, and
torch.utils.checkpoint restores the RNG state before recomputing, so the recomputed forward regenerates the very
same mask. model.generate works as on the base model (eval mode: no dropout).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from ..config import LoraConfig
from ..inject import ModulesToSaveWrapper, inject_lora, lora_layers, model_adapters
from ..layers import DEFAULT_ADAPTER
from ..persistence import PREFIX, WEIGHTS_NAME, adapter_tensors, own_name, own_names, save_adapters
from ..training.distributed import unwrap

# transformers' SAFE_WEIGHTS_INDEX_NAME: the file Trainer's resume path reads when there is no model.safetensors.
INDEX_NAME = "model.safetensors.index.json"
# The adapters other than "default", under the model's own parameter names: what Trainer's resume loads for them.
NAMED_ADAPTERS_NAME = "named_adapters.safetensors"
_HOOKS_ATTR = "_lora_kernels_adapter_checkpoints"  # True: installed; False: turned off on purpose


def apply_fused_lora(model: PreTrainedModel, config: Optional[LoraConfig] = None, **config_kwargs) -> PreTrainedModel:
    """Inject fused LoRA into a transformers model in place and return it.

    Pass a LoraConfig, or its fields as keyword arguments (apply_fused_lora(model, r=8, target_modules=[...])).
    The model then saves adapter-only checkpoints under transformers.Trainer and resumes from them (see the
    module docstring).
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__} "
                         "(use lora_kernels.inject_lora for a plain nn.Module)")
    if config is not None and config_kwargs:
        raise ValueError(f"pass either config or keyword arguments, not both (got config and {sorted(config_kwargs)})")
    if config is None:
        config = LoraConfig(**config_kwargs)
    inject_lora(model, config)
    return enable_adapter_checkpoints(model)


def enable_adapter_checkpoints(model: PreTrainedModel) -> PreTrainedModel:
    """Make `model.save_pretrained` write the adapter only (PEFT format) and let Trainer resume from what it wrote.

    In place, on this instance only; calling it again does nothing, and so does calling it on a model passed to
    disable_adapter_checkpoints. Returns `model`.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if _HOOKS_ATTR in vars(model):  # installed already, or turned off on purpose
        return model
    # An instance attribute shadows the class's method for this model only. A partial of a module-level function
    # follows the model through copy.deepcopy (bound to the copy) and torch.save of the whole module; a bound
    # method would be restored as the class's own save_pretrained, and a swapped-in subclass (named like the
    # original) could not be serialised at all.
    model.save_pretrained = functools.partial(_save_pretrained, model)
    model.register_load_state_dict_pre_hook(_load_peft_keys)
    object.__setattr__(model, _HOOKS_ATTR, True)
    return model


def disable_adapter_checkpoints(model: PreTrainedModel) -> PreTrainedModel:
    """Undo enable_adapter_checkpoints for good on this model: save_pretrained writes the full model again and
    Trainer's checkpoints are full-model ones (as before; add AdapterCheckpointCallback to also get the adapter
    in each). Later inject_lora calls leave it off. Needed for Trainer's `load_best_model_at_end=True`, which
    cannot load an adapter-only checkpoint of a model that is not a PeftModel. Returns `model`."""
    if vars(model).get(_HOOKS_ATTR):
        del model.save_pretrained
        for key, hook in list(model._load_state_dict_pre_hooks.items()):
            if getattr(hook, "hook", hook) is _load_peft_keys:
                del model._load_state_dict_pre_hooks[key]
    object.__setattr__(model, _HOOKS_ATTR, False)
    return model


# -- save -----------------------------------------------------------------------------------------------------

def _save_pretrained(self: PreTrainedModel, save_directory, is_main_process: bool = True,
                     state_dict: Optional[dict] = None, **kwargs):
    """save_pretrained of a model with fused LoRA: every adapter in PEFT's format and layout, as
    PeftModel.save_pretrained ("default" at save_directory, any other adapter in save_directory/<name>), plus
    what Trainer's resume reads (see the module docstring)."""
    if not lora_layers(self):
        # merged or unloaded: a plain transformers model again, saved in full by transformers.
        return type(self).save_pretrained(self, save_directory, is_main_process=is_main_process,
                                          state_dict=state_dict, **kwargs)
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for a model with fused LoRA adapters; "
                         "save to a directory and upload it with huggingface_hub")
    if not is_main_process:
        return
    directory = os.fspath(save_directory)
    # state_dict: Trainer passes the gathered one under DeepSpeed and FSDP, where the module's own parameters
    # may be shards; the adapters' tensors are taken from it, by the model's own names.
    save_adapters(self, directory, state_dict=state_dict)
    _write_resume_files(self, directory, state_dict)


def _write_resume_files(model: nn.Module, directory: str, state_dict: Optional[dict]) -> None:
    """The sharded-checkpoint index transformers.Trainer reads on resume. "default"'s tensors (by the model's own
    names) are in adapter_model.safetensors under PEFT's keys, which the load pre-hook translates. The other
    adapters' files use the very same keys (PEFT's files do not name the adapter), so for resume their tensors
    are also written, under the model's own names, to NAMED_ADAPTERS_NAME, which the index points them at."""
    weight_map: Dict[str, str] = {}
    named: Dict[str, torch.Tensor] = {}
    for adapter in model_adapters(model):
        names = own_names(model, adapter)
        if adapter == DEFAULT_ADAPTER:
            weight_map.update({own: WEIGHTS_NAME for own in names.values()})
            continue
        tensors = adapter_tensors(model, adapter, state_dict)
        for key, own in names.items():
            named[own] = tensors[key]
    for own in weight_map:  # a trained bias or modules_to_save copy, in every adapter's file: "default"'s serves
        named.pop(own, None)
    weight_map.update({own: NAMED_ADAPTERS_NAME for own in named})
    path = os.path.join(directory, NAMED_ADAPTERS_NAME)
    if named:
        from safetensors.torch import save_file

        tmp = os.path.join(directory, f".{NAMED_ADAPTERS_NAME}.tmp")
        save_file(named, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    elif os.path.exists(path):  # an earlier save's, in a reused directory: nothing points at it any more
        os.unlink(path)
    index = {
        "metadata": {"format": f"lora_kernels adapter-only checkpoint: the frozen base weights are not here; "
                               f"the adapter 'default' is in {WEIGHTS_NAME} under PEFT's keys, the others in "
                               f"their subfolders (PEFT's format) and again in {NAMED_ADAPTERS_NAME} under the "
                               "model's own names"},
        "weight_map": dict(sorted(weight_map.items())),
    }
    tmp = os.path.join(directory, f".{INDEX_NAME}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, INDEX_NAME))


# -- load -----------------------------------------------------------------------------------------------------

def _peft_keys_adapter(model: nn.Module) -> Optional[str]:
    """The adapter that PEFT-keyed tensors given to load_state_dict fill: "default" (what a checkpoint's root
    holds), else the model's only adapter; None when that is ambiguous (several adapters, none "default")."""
    names = model_adapters(model)
    if DEFAULT_ADAPTER in names or not names:
        return DEFAULT_ADAPTER
    return names[0] if len(names) == 1 else None


def _load_peft_keys(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs) -> None:
    """load_state_dict pre-hook: PEFT-keyed adapter tensors load into the model's own parameters."""
    peft_prefix = prefix + PREFIX
    keys = [k for k in state_dict if k.startswith(peft_prefix)]
    if not keys:
        return
    own = set(module.state_dict().keys())
    keys = [k for k in keys if k[len(prefix):] not in own]  # a model whose own names start with base_model.model.
    if not keys:
        return
    adapter = _peft_keys_adapter(module)
    if adapter is None:
        # Recorded as a load error (raised even with strict=False), as below.
        error_msgs.append(f"adapter keys such as {keys[0]!r} are PEFT's, which do not say which adapter they belong "
                          f"to, and {type(module).__name__} has several adapters {model_adapters(module)}, none "
                          "named 'default'; load each adapter folder with lora_kernels.load_adapter(model, path, "
                          "adapter_name=...)")
        return
    layers = lora_layers(module)
    wrappers = [n for n, m in module.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for key in keys:
        name = own_name(module, key[len(peft_prefix):], adapter, layers, wrappers, own)
        if name is None:
            # Recorded as a load error (raised even with strict=False): a checkpoint's adapter must load entirely.
            error_msgs.append(f"adapter key {key!r} names no LoRA layer of adapter {adapter!r}, trained bias or "
                              f"modules_to_save tensor of {type(module).__name__}")
            continue
        state_dict[prefix + name] = state_dict.pop(key)


# -- callback -------------------------------------------------------------------------------------------------

def _callback_class():
    from transformers import TrainerCallback

    class AdapterCheckpointCallback(TrainerCallback):
        """Writes the adapters (PEFT format and layout, via save_adapters: "default" at the root, any other in a
        subfolder named after it) into every checkpoint-<step> directory Trainer saves, and into `output_dir` at
        the end of training, so each checkpoint is loadable with load_adapter or PeftModel.from_pretrained.

        A model from apply_fused_lora / inject_lora no longer needs it (its own save_pretrained writes the adapter
        into each checkpoint, see the module docstring); it stays for plain nn.Module models, which Trainer saves
        as a bare state dict, and for code written before.
        """

        def on_save(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
            if state.is_world_process_zero and model is not None:
                directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                save_adapters(unwrap(model), directory)
            return control

        def on_train_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
            if state.is_world_process_zero and model is not None:
                save_adapters(unwrap(model), args.output_dir)
            return control

    # Named as if defined at module level (repr, and lookup by name resolves through __getattr__ below).
    AdapterCheckpointCallback.__module__ = __name__
    AdapterCheckpointCallback.__qualname__ = "AdapterCheckpointCallback"
    return AdapterCheckpointCallback


def __getattr__(name):
    # inject_lora imports this module for every transformers model, and TrainerCallback's import pulls in
    # Trainer's whole stack (training_args, accelerate: some 850 modules, seconds on a small machine). The
    # callback class is therefore built on first use (`from ... import AdapterCheckpointCallback` included).
    if name == "AdapterCheckpointCallback":
        cls = globals()[name] = _callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
