"""An adapter file holding NaN or inf is refused on load, naming the file and the key; allow_nonfinite opts out."""
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_kernels as lk
from lora_kernels.inject import lora_layers
from lora_kernels.persistence import WEIGHTS_NAME, read_adapter
from tiny_models import tiny_llama

KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture
def adapter_dir(tmp_path):
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    path = tmp_path / "adapter"
    lk.save_adapter(model, path)
    return path


def _poison(path, value):
    weights = os.path.join(path, WEIGHTS_NAME)
    tensors = load_file(weights)
    assert KEY in tensors
    tensors[KEY][2, 1] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    return weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_adapter_is_refused_naming_file_and_key(adapter_dir, value):
    weights = _poison(adapter_dir, value)
    expected = re.escape(f"{weights}: key {KEY!r} holds 1 NaN/inf value(s)")
    with pytest.raises(ValueError, match=expected):
        read_adapter(adapter_dir)
    model = tiny_llama()
    with pytest.raises(ValueError, match=expected):
        lk.load_adapter(model, adapter_dir)
    assert not lora_layers(model), "a refused adapter must leave the model unchanged"


def test_allow_nonfinite_loads_it_for_inspection(adapter_dir):
    _poison(adapter_dir, float("nan"))
    _, tensors = read_adapter(adapter_dir, allow_nonfinite=True)
    assert torch.isnan(tensors[KEY]).sum() == 1
    model = lk.load_adapter(tiny_llama(), adapter_dir, allow_nonfinite=True)
    assert torch.isnan(lora_layers(model)["model.layers.1.self_attn.v_proj"].lora_B).sum() == 1
