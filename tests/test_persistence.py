"""save_adapter / load_adapter against PEFT's own save_pretrained / from_pretrained."""
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_kernels as lk
from lora_kernels.inject import lora_layers
from tiny_models import (ALL_PROJ, assert_rel_close, lk_lora_grads, peft_lora_grads, tiny_llama, tokens)


@pytest.fixture
def peft_dir(tmp_path):
    """A PEFT-saved adapter with non-zero B on all seven projections (and per-module ranks)."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ,
                                                           init_lora_weights=False, rank_pattern={"o_proj": 2},
                                                           alpha_pattern={"down_proj": 3}))
    path = tmp_path / "peft_adapter"
    pm.save_pretrained(path)
    return path


def _loss_and_grads_peft(path, x):
    pm = peft.PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    pm.train()
    out = pm(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), peft_lora_grads(pm)


def _loss_and_grads_ours(path, x):
    m = lk.load_adapter(tiny_llama(), path)
    m.train()
    out = m(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), lk_lora_grads(m)


def _check_same(path, x):
    logits_p, grads_p = _loss_and_grads_peft(path, x)
    logits, grads = _loss_and_grads_ours(path, x)
    with torch.no_grad():
        assert not torch.allclose(logits, tiny_llama()(x).logits, atol=1e-3)  # the adapter matters
    assert_rel_close(logits, logits_p, what="logits")
    assert grads.keys() == grads_p.keys()
    for key, g in grads.items():
        assert_rel_close(g, grads_p[key], what=str(key))


def test_peft_saved_adapter_gives_same_logits_and_grads(peft_dir, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    _check_same(peft_dir, tokens())


def test_peft_saved_adapter_same_logits_and_grads_on_triton_kernels(peft_dir):
    # auto backend: the real Triton kernels (under TRITON_INTERPRET=1 on CPU)
    from lora_kernels import resolve_backend
    assert resolve_backend(torch.zeros(1)) == "triton"
    _check_same(peft_dir, tokens(batch=1, seq=5))


def test_save_adapter_loads_in_peft_with_same_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ,
                                                   init_lora_weights=False, rank_pattern={"v_proj": 2}))
    lk.inject_lora(m, lk.LoraConfig(r=3, lora_alpha=5, target_modules=["lm_head"], init_lora_weights=False))
    lk.save_adapter(m, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path)) == ["ours"]
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert "base_model.model.lm_head.lora_B.weight" in sd and len(sd) == 2 * 15
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    x = tokens()
    with torch.no_grad():
        assert_rel_close(m.eval()(x).logits, pm.eval()(x).logits, what="logits")
    # and back: our own loader reads it, too
    m2 = lk.load_adapter(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close(m2.eval()(x).logits, m(x).logits, rel=1e-6, what="round trip")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_and_modules_to_save_round_trip_with_peft(tmp_path, bias, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, modules_to_save=["lm_head"],
              init_lora_weights=False)
    pm = peft.get_peft_model(tiny_llama(attention_bias=True), peft.LoraConfig(**kw))
    with torch.no_grad():  # make the trained biases and the saved head differ from the base
        for n, p in pm.named_parameters():
            if p.requires_grad and ".lora_" not in n:
                p.add_(0.5)
    pm.save_pretrained(tmp_path / "p")
    m = lk.load_adapter(tiny_llama(attention_bias=True), tmp_path / "p")
    x = tokens()
    with torch.no_grad():
        assert_rel_close(m.eval()(x).logits, pm.eval()(x).logits, what="PEFT -> ours")
    lk.save_adapter(m, tmp_path / "o")
    assert load_file(tmp_path / "o" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "p" / "adapter_model.safetensors").keys()
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(attention_bias=True), tmp_path / "o")
    with torch.no_grad():
        assert_rel_close(pm2.eval()(x).logits, pm(x).logits, what="ours -> PEFT")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_preserved(tmp_path, dtype):
    m = tiny_llama().to(dtype)
    lk.inject_lora(m, lk.LoraConfig(target_modules=["q_proj"]))
    for layer in lora_layers(m).values():  # adapters in the base dtype instead of from_linear's fp32 default
        layer.lora_A.data = layer.lora_A.data.to(dtype)
        layer.lora_B.data = layer.lora_B.data.to(dtype)
    lk.save_adapter(m, tmp_path / "a")
    assert {t.dtype for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values()} == {dtype}


def test_fp32_adapter_of_half_model_saved_in_fp32(tmp_path):
    m = lk.inject_lora(tiny_llama().to(torch.bfloat16), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(m, tmp_path / "a")
    assert {t.dtype for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values()} == {torch.float32}


def test_is_trainable_false_freezes_the_adapter(peft_dir):
    m = lk.load_adapter(tiny_llama(), peft_dir, is_trainable=False)
    assert lk.trainable_parameters(m)[0] == 0


# -- atomic save ---------------------------------------------------------------------------------------

def _interrupting_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 17)  # a few bytes, then the "crash"
    raise KeyboardInterrupt


def test_interrupted_save_of_new_directory_leaves_nothing(tmp_path, monkeypatch):
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    monkeypatch.setattr("safetensors.torch.save_file", _interrupting_save_file)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(m, tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_the_previous_adapter(tmp_path, monkeypatch):
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(m, tmp_path / "a")
    before = {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")}
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.add_(1.0)
    monkeypatch.setattr("safetensors.torch.save_file", _interrupting_save_file)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(m, tmp_path / "a")
    assert {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")} == before
    monkeypatch.undo()
    lk.save_adapter(m, tmp_path / "a")  # a completed overwrite does replace it
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layer"):
        lk.save_adapter(tiny_llama(), tmp_path / "x")
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], lora_dropout=0.1))
    lk.inject_lora(m, lk.LoraConfig(target_modules=["v_proj"], lora_dropout=0.2))
    with pytest.raises(ValueError, match="lora_dropout"):
        lk.save_adapter(m, tmp_path / "x")
    (tmp_path / "file").write_text("")
    m2 = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not a directory"):
        lk.save_adapter(m2, tmp_path / "file")


# -- bad directories: a clear error, the model untouched ---------------------------------------------------

def _snapshot(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_same(model, snap):
    mods, params = _snapshot(model)
    assert mods == snap[0]
    assert params.keys() == snap[1].keys()
    for n, (v, rg) in snap[1].items():
        assert rg == params[n][1] and torch.equal(v, params[n][0]), n


def _corrupt_truncate(d):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_garbage(d):
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file")


def _edit_config(**change):
    def edit(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(change)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def _edit_tensors(fn):
    def edit(d):
        sd = load_file(d / "adapter_model.safetensors")
        fn(sd)
        save_file(sd, d / "adapter_model.safetensors")
    return edit


_KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("corrupt, exc, match", [
    (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "adapter_config.json"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "adapter_model.safetensors"),
    (lambda d: (d / "adapter_config.json").write_text("{ not json"), ValueError, "adapter_config.json.*JSON"),
    (_corrupt_truncate, ValueError, "adapter_model.safetensors"),
    (_corrupt_garbage, ValueError, "adapter_model.safetensors"),
    (_edit_config(peft_type="IA3"), ValueError, "adapter_config.json.*peft_type.*IA3"),
    (_edit_config(use_dora=True), ValueError, "safetensors.*missing.*lora_magnitude_vector"),
    (_edit_config(r=0), ValueError, "adapter_config.json.*r must"),
    (_edit_config(target_modules=["nope"]), ValueError, "adapter_config.json.*matched no module"),
    (_edit_config(target_modules=["q_proj", "v_proj"]), ValueError, "missing.*v_proj"),
    (_edit_tensors(lambda sd: sd.pop(_KEY)), ValueError, f"safetensors.*missing.*{_KEY}"),
    (_edit_tensors(lambda sd: sd.update({_KEY: torch.zeros(5, 48)})), ValueError,
     rf"safetensors.*{_KEY}.*\(5, 48\).*\(4, 48\)"),
    (_edit_tensors(lambda sd: sd.update({"base_model.model.extra.lora_A.weight": torch.zeros(1)})), ValueError,
     "safetensors.*extra"),
    (_edit_tensors(lambda sd: sd.update({_KEY: torch.zeros(4, 48, dtype=torch.int32)})), ValueError,
     f"{_KEY}.*int32"),
])
def test_bad_adapter_dir_raises_and_leaves_model_unchanged(tmp_path, corrupt, exc, match):
    src = lk.inject_lora(tiny_llama(seed=3), lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(src, tmp_path / "a")
    corrupt(tmp_path / "a")
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        lk.load_adapter(model, tmp_path / "a")
    _assert_same(model, snap)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lk.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_loading_into_existing_adapter_of_other_shape_leaves_it(tmp_path):
    src = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(src, tmp_path / "a")
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"shape \(4, 48\).*needs \(2, 48\)"):
        lk.load_adapter(model, tmp_path / "a")
    _assert_same(model, snap)
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="lora_alpha"):
        lk.load_adapter(model, tmp_path / "a")
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.load_adapter(model, tmp_path / "a")  # same hyper-parameters: loads into the existing layers
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.lora_B, lora_layers(src)[name].lora_B, rtol=0, atol=0)


def test_save_adapter_records_base_model_and_task_type(tmp_path):
    import json

    from tiny_models import tiny_llama

    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "a", base_model_name_or_path="/models/base", task_type="CAUSAL_LM")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "/models/base" and saved["task_type"] == "CAUSAL_LM"
