"""lora_kernels.integrations: fuse_peft_model against PEFT itself, apply_fused_lora with Trainer,
gradient checkpointing and generate."""
import os

import peft
import pytest
import torch
import torch.nn as nn
from helpers import set_checkpointing

import lora_kernels as lk
from lora_kernels.inject import lora_layers
from lora_kernels.integrations.peft import FusedPeftLinear, fuse_peft_model, unfuse_peft_model
from lora_kernels.integrations.transformers import AdapterCheckpointCallback, apply_fused_lora
from tiny_models import ALL_PROJ, assert_rel_close, peft_lora_grads, peft_lora_names, tiny_llama, tokens


def _peft_model(**kw):
    args = dict(r=4, lora_alpha=8, target_modules=ALL_PROJ, init_lora_weights=False)
    args.update(kw)
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(**args))


def _logits_and_grads(pm, x):
    pm.zero_grad()
    out = pm(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {k: g.clone() for k, g in peft_lora_grads(pm).items()}


# -- fuse_peft_model ----------------------------------------------------------------------------------------

def test_fused_peft_model_same_logits_and_grads_on_triton(count_kernel_calls):
    pm = _peft_model()
    x = tokens(batch=1, seq=5)
    ref_logits, ref_grads = _logits_and_grads(pm, x)
    report = fuse_peft_model(pm)
    assert len(report.fused) == 14 and not report.skipped
    logits, grads = _logits_and_grads(pm, x)
    assert len(count_kernel_calls) == 14
    assert_rel_close(logits, ref_logits, what="logits")
    for k, g in grads.items():
        assert_rel_close(g, ref_grads[k], what=str(k))


def test_fused_peft_model_keeps_peft_save_load_merge(tmp_path, monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft_model()
    fuse_peft_model(pm)
    x = tokens()
    pm.eval()
    with torch.no_grad():
        fused_logits = pm(x).logits
        assert count_kernel_calls
        with pm.disable_adapter():  # PEFT's own switch still works, on PEFT's path
            n = len(count_kernel_calls)
            torch.testing.assert_close(pm(x).logits, tiny_llama()(x).logits)
            assert len(count_kernel_calls) == n
    pm.save_pretrained(tmp_path / "a")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    ours = lk.load_adapter(tiny_llama(), tmp_path / "a").eval()
    with torch.no_grad():
        assert_rel_close(reloaded(x).logits, fused_logits, what="PEFT reload")
        assert_rel_close(ours(x).logits, fused_logits, what="lk reload")
        merged = pm.merge_and_unload()
        assert not any(isinstance(m, FusedPeftLinear) for m in merged.modules())
        assert_rel_close(merged(x).logits, fused_logits, what="merged")


def test_merged_peft_layer_runs_peft_path(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft_model()
    fuse_peft_model(pm)
    x = tokens()
    with torch.no_grad():
        before = pm.eval()(x).logits
        pm.base_model.merge_adapter()
        n = len(count_kernel_calls)
        assert_rel_close(pm(x).logits, before, what="merged")
        assert len(count_kernel_calls) == n
        pm.base_model.unmerge_adapter()
        assert_rel_close(pm(x).logits, before, what="unmerged")
        assert len(count_kernel_calls) == n + 14


def test_unservable_layers_are_reported_and_still_work(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                           init_lora_weights=False))
    x = tokens()
    with torch.no_grad():
        ref = pm.eval()(x).logits
    report = fuse_peft_model(pm)
    assert len(report.fused) == 2
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in report.skipped["base_model.model.model.embed_tokens"]
    assert "left 1 on PEFT's path" in str(report)
    with torch.no_grad():
        assert_rel_close(pm(x).logits, ref, what="logits")


def test_dora_layers_are_fused(monkeypatch):
    """PEFT's DoRA Linear is served (tests/test_dora_peft.py compares it with PEFT's own forward)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft_model(target_modules=["q_proj"], use_dora=True)
    report = fuse_peft_model(pm)
    assert len(report.fused) == 2 and not report.skipped


def test_conv_layers_are_reported():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    report = fuse_peft_model(pm)
    assert report.fused == ["base_model.model.2"]
    assert "Conv2d" in report.skipped["base_model.model.0"]


def test_multiple_active_adapters(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft_model(target_modules=["q_proj"])
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])
    x = tokens()
    with torch.no_grad():
        both = pm.eval()(x).logits
    report = fuse_peft_model(pm)
    assert not report.fused and all("2 active adapters" in r for r in report.skipped.values())
    # fused while one adapter was active, then two activated: that call goes to PEFT's path
    pm.base_model.set_adapter("default")
    assert len(fuse_peft_model(pm).fused) == 2
    pm.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, both)
    assert not count_kernel_calls


def test_unfuse_restores_peft_class(count_kernel_calls):
    pm = _peft_model(target_modules=["q_proj"])
    fuse_peft_model(pm)
    assert len(unfuse_peft_model(pm)) == 2
    assert all(type(m) is peft.tuners.lora.Linear for m in peft_lora_names(pm).values())
    with torch.no_grad():
        pm(tokens())
    assert not count_kernel_calls


def test_fuse_rejects_models_without_peft_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        fuse_peft_model(tiny_llama())
    with pytest.raises(ValueError, match="peft_model"):
        fuse_peft_model("model")


# -- transformers -------------------------------------------------------------------------------------------

def test_apply_fused_lora_arguments():
    m = apply_fused_lora(tiny_llama(), r=2, target_modules=["q_proj"])
    assert len(lora_layers(m)) == 2 and lora_layers(m)["model.layers.0.self_attn.q_proj"].r == 2
    with pytest.raises(ValueError, match="PreTrainedModel"):
        apply_fused_lora(nn.Linear(2, 2), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="either config or keyword"):
        apply_fused_lora(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]), r=2)
    with pytest.raises(ValueError, match="target_modules"):
        apply_fused_lora(tiny_llama(), r=2, target_modules=[])


@pytest.mark.parametrize("backend, reentrant", [("torch", False), ("torch", True), ("auto", False)])
def test_gradient_checkpointing_reuses_the_dropout_mask(monkeypatch, backend, reentrant):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    x = tokens(batch=1, seq=5) if backend == "auto" else tokens()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.3,
               init_lora_weights=False)

    def grads(checkpointing, p=0.3):
        m = apply_fused_lora(tiny_llama(), **{**cfg, "lora_dropout": p})
        if checkpointing:
            set_checkpointing(m, use_reentrant=reentrant)
        m.train()
        calls = []
        lora_layers(m)["model.layers.0.self_attn.q_proj"].register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(1234)
        m(x, labels=x).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing did recompute the forward
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g, rtol=1e-5, atol=1e-7, msg=n)
    # the test can fail: dropout does change the gradients
    no_dropout = grads(False, p=0.0)
    assert any(not torch.allclose(no_dropout[n], g) for n, g in plain.items())


def test_generate_matches_merged_model(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    m = apply_fused_lora(tiny_llama(), r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1)
    m.eval()
    x = tokens(batch=1, seq=4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = m.generate(x, **kw)
    with lk.disable_adapter(m):
        base_out = m.generate(x, **kw)
    merged_out = lk.merge_and_unload(m).generate(x, **kw)
    torch.testing.assert_close(out, merged_out)
    torch.testing.assert_close(base_out, tiny_llama().generate(x, **kw))
    assert out.shape == (1, 10)


def test_trainer_trains_and_checkpoints_hold_a_loadable_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    from transformers import Trainer, TrainingArguments

    # lm_head is targeted too: the tiny random head alone cannot produce confident logits
    model = apply_fused_lora(tiny_llama(), r=8, lora_alpha=16, target_modules=ALL_PROJ + ["lm_head"])
    g = torch.Generator().manual_seed(0)
    # a learnable pattern: each sequence repeats one of two short motifs
    motifs = torch.randint(0, 128, (2, 4), generator=g).repeat(8, 1)
    data = [{"input_ids": m.repeat(4), "labels": m.repeat(4)} for m in motifs]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8,
                             learning_rate=3e-2, logging_steps=1, save_steps=12, save_strategy="steps", save_only_model=True,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-4:]) / 4 < 0.6 * losses[0], losses
    ckpt = tmp_path / "checkpoint-24"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ckpt))
    assert (tmp_path / "checkpoint-12" / "adapter_model.safetensors").exists()
    x = tokens()
    model.eval()
    loaded = lk.load_adapter(tiny_llama(), ckpt).eval()
    reloaded_peft = peft.PeftModel.from_pretrained(tiny_llama(), ckpt).eval()
    with torch.no_grad():
        trained = model(x).logits
        assert_rel_close(loaded(x).logits, trained, rel=1e-6, what="load_adapter")
        assert_rel_close(reloaded_peft(x).logits, trained, what="PeftModel.from_pretrained")
