"""GPT-2 family: transformers' Conv1D projections (weight stored (in, out)) take adapters as PEFT's
fan_in_fan_out=True does — same targets for all-linear, same outputs and gradients, same files, same merge —
and the kernels read the stored weight through a transposed view, never a copy."""
import json

import pytest
import torch

import lora_kernels as lk
from lora_kernels.layer import FusedLoraLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))


def _lora_names(model, cls):
    return sorted(n.replace("base_model.model.", "") for n, m in model.named_modules() if isinstance(m, cls))


def _peft_adapter(tmp_path, **cfg):
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(init_lora_weights=False, **cfg))
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


def _logits_and_grads(model):
    model.zero_grad()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def test_all_linear_matches_what_peft_matches():
    ours = lk.inject_lora(tiny_gpt2(), lk.LoraConfig(r=4, target_modules="all-linear"))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules="all-linear"))
    from peft.tuners.lora import LoraLayer

    names = _lora_names(ours, FusedLoraLinear)
    assert names == _lora_names(theirs, LoraLayer)
    assert any(n.endswith("attn.c_attn") for n in names) and not any("lm_head" in n for n in names)
    assert all(ours.get_submodule(n).fan_in_fan_out for n in names)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_listed_conv1d_targets_compute_peft_outputs_and_gradients(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    theirs, path = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])
    ours = lk.load_adapter(tiny_gpt2(), path)
    conv = tiny_gpt2().transformer.h[0].attn.c_attn
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, FusedLoraLinear) and layer.fan_in_fan_out
    assert layer.weight.shape == conv.weight.shape  # kept as Conv1D stores it: (in, out)
    assert (layer.in_features, layer.out_features) == (conv.nx, conv.nf)
    want_logits, want_grads = _logits_and_grads(theirs)
    got_logits, got_grads = _logits_and_grads(ours)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    for name, g in want_grads.items():
        name = name.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        assert torch.allclose(got_grads[name], g, atol=1e-5), name


def test_kernels_read_the_conv1d_weight_through_a_view(monkeypatch):
    """The Triton launcher gets the stored (in, out) weight transposed: same storage, no contiguous copy."""
    from lora_kernels.ops import lora_linear_fwd as fwd_module

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    model = lk.inject_lora(tiny_gpt2(), lk.LoraConfig(r=4, target_modules=["c_fc"], init_lora_weights=False))
    layer = model.transformer.h[0].mlp.c_fc
    seen = []
    real = fwd_module.lora_linear_fwd

    def spy(x, rows, weight, *args, **kwargs):
        seen.append((weight.data_ptr(), weight.is_contiguous(), tuple(weight.shape)))
        return real(x, rows, weight, *args, **kwargs)

    monkeypatch.setattr(fwd_module, "lora_linear_fwd", spy)
    x = torch.randn(5, layer.in_features)
    y = layer(x)
    assert seen and seen[0] == (layer.weight.data_ptr(), False, (layer.out_features, layer.in_features))
    want = x @ layer.weight + layer.bias + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.allclose(y, want, atol=1e-5)


def test_saved_adapter_is_peft_loadable_and_merge_gives_conv1d(tmp_path):
    model = lk.inject_lora(tiny_gpt2(), lk.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False))
    with torch.no_grad():
        want = model(IDS).logits
    lk.save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, want, atol=1e-5)
        peft_merged = loaded.merge_and_unload()(IDS).logits
    merged = lk.merge_and_unload(model)
    assert type(merged.transformer.h[1].attn.c_attn) is Conv1D
    with torch.no_grad():
        got = merged(IDS).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, peft_merged, atol=1e-5)
    base = lk.unload(lk.inject_lora(tiny_gpt2(), lk.LoraConfig(r=2, target_modules=["c_attn"])))
    assert type(base.transformer.h[0].attn.c_attn) is Conv1D
    with torch.no_grad():
        assert torch.equal(base(IDS).logits, tiny_gpt2()(IDS).logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fuse_peft_model_serves_conv1d_layers(backend, tmp_path, monkeypatch):
    from lora_kernels.integrations import peft as lk_peft

    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    theirs, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules="all-linear")
    want_logits, want_grads = _logits_and_grads(theirs)
    report = lk_peft.fuse_peft_model(theirs)
    assert not report.skipped and any(n.endswith("attn.c_attn") for n in report.fused)
    calls = []
    real = lk_peft.fused_lora_linear
    monkeypatch.setattr(lk_peft, "fused_lora_linear", lambda x, w, *a, **k: calls.append(w.shape) or real(x, w, *a, **k))
    got_logits, got_grads = _logits_and_grads(theirs)
    assert len(calls) == len(report.fused)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5), name
