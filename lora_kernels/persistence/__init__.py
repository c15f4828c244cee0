"""save_adapter / load_adapter in PEFT's on-disk format.

A directory holds adapter_config.json (PEFT's LoraConfig fields, peft_type "LORA") and adapter_model.safetensors
with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (plus `.base_layer.bias` for trained
biases of adapted layers, `<path>.bias` for other trained biases and `<path>.<param>` for modules_to_save), in the
tensors' own dtype. Either library reads what the other writes.

A model with several named adapters saves and loads one adapter per directory (adapter_name=), under the same
keys as a single-adapter save, which is what PEFT's save_pretrained writes for each of its adapters.
save_adapters writes all of them in PeftModel.save_pretrained's layout: "default" in the directory itself, every
other adapter in a subfolder named after it.

Saving replaces config and weights together (a crash leaves the old adapter or the new one, never a mix; see
save_adapter). Loading validates the whole directory against the model (peft_type, every key, every shape,
finite values) before it changes anything.
"""
from __future__ import annotations
from .keys import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, PathLike, adapter_config, adapter_state_dict,  # noqa: F401
                   adapter_tensors, own_name, own_names)
from .read import load_adapter, read_adapter  # noqa: F401
from .write import PREVIOUS, STAGING, adapter_folder, save_adapter, save_adapters  # noqa: F401
