"""inject_lora and the model-level helpers, each checked against PEFT on a tiny Llama."""
import re

import peft
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.inject import ModulesToSaveWrapper, lora_layers
from tiny_models import ALL_PROJ, peft_lora_names, tiny_llama, tokens


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def _both(**kwargs):
    """(PEFT model, our injected model) from the same base weights and the same config."""
    pm = peft.get_peft_model(tiny_llama(attention_bias=True), peft.LoraConfig(**kwargs))
    m = lk.inject_lora(tiny_llama(attention_bias=True), lk.LoraConfig(**kwargs))
    return pm, m


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ALL_PROJ},
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "layers.1.mlp.down_proj"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": r"model\.layers\.0\.mlp\..*_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj", "layers.0.mlp.up_proj"]},
    {"target_modules": ALL_PROJ, "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": ALL_PROJ, "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
     "alpha_pattern": {"v_proj": 3, "gate_proj": 32}},
    {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "r": 16},
    {"target_modules": None},
])
def test_targets_ranks_and_scalings_match_peft(kwargs):
    pm, m = _both(r=kwargs.pop("r", 4), lora_alpha=8, **kwargs)
    theirs = peft_lora_names(pm)
    ours = lora_layers(m)
    assert sorted(ours) == sorted(theirs)
    for name, layer in ours.items():
        assert layer.r == theirs[name].r["default"], name
        assert layer.scaling == pytest.approx(theirs[name].scaling["default"]), name


def test_all_linear_skips_output_head():
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules="all-linear"))
    assert isinstance(m.lm_head, nn.Linear)
    assert len(lora_layers(m)) == 14


def test_shares_base_tensors_and_freezes_everything_else():
    base = tiny_llama(attention_bias=True)
    q = base.model.layers[0].self_attn.q_proj
    w, b = q.weight, q.bias
    lk.inject_lora(base, lk.LoraConfig(target_modules=["q_proj"]))
    layer = base.model.layers[0].self_attn.q_proj
    assert layer.weight is w and layer.bias is b
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB"}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_trainable_counts_and_print_match_peft(bias, modules_to_save, capsys):
    pm, m = _both(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, modules_to_save=modules_to_save)
    assert lk.trainable_parameters(m) == pm.get_nb_trainable_parameters()
    theirs = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1", n.removeprefix("base_model.model."))
              .replace(".base_layer", "").replace("modules_to_save.default", "trained_module")
              for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n for n, p in m.named_parameters() if p.requires_grad}
    assert ours == theirs
    pm.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    lk.print_trainable_parameters(m)
    assert capsys.readouterr().out == peft_line


def test_modules_to_save_trains_a_copy_and_disable_restores_original():
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(m.lm_head, ModulesToSaveWrapper)
    with torch.no_grad():
        m.lm_head.trained_module.weight.add_(1.0)
    x = tokens()
    base_logits = tiny_llama()(x).logits
    assert not torch.allclose(m(x).logits, base_logits)
    with lk.disable_adapter(m):
        torch.testing.assert_close(m(x).logits, base_logits)


def test_merge_and_unload_equals_peft_merged_model():
    kw = dict(r=4, lora_alpha=8, target_modules=ALL_PROJ, init_lora_weights=False)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(**kw))
    with torch.no_grad():  # same adapter weights in both
        for name, layer in lora_layers(m).items():
            layer.lora_A.copy_(peft_lora_names(pm)[name].lora_A["default"].weight)
            layer.lora_B.copy_(peft_lora_names(pm)[name].lora_B["default"].weight)
    x = tokens()
    with torch.no_grad():
        before = m(x).logits
    merged_peft = pm.merge_and_unload()
    merged = lk.merge_and_unload(m)
    assert not lora_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    theirs = merged_peft.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, before, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(x).logits, merged_peft(x).logits, rtol=1e-5, atol=1e-6)


def test_unload_restores_the_base_model():
    base_sd = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=ALL_PROJ, init_lora_weights=False,
                                                   modules_to_save=["lm_head"]))
    lora_layers(m)["model.layers.0.self_attn.q_proj"].merge()  # a merged layer is unmerged on unload
    m = lk.unload(m)
    assert not lora_layers(m) and type(m.lm_head) is nn.Linear
    sd = m.state_dict()
    assert sd.keys() == base_sd.keys()
    for k, v in base_sd.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_disable_adapter_context_gives_base_output_then_restores():
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=ALL_PROJ, init_lora_weights=False))
    x = tokens()
    with torch.no_grad():
        base, adapted = tiny_llama()(x).logits, m(x).logits
        assert not torch.allclose(base, adapted)
        with lk.disable_adapter(m):
            torch.testing.assert_close(m(x).logits, base)
        torch.testing.assert_close(m(x).logits, adapted)


def test_reinject_adds_new_targets_and_leaves_existing_untouched():
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    q = lora_layers(m)["model.layers.0.self_attn.q_proj"]
    qa, qb = q.lora_A, q.lora_B
    saved = qa.detach().clone()
    lk.set_trainable(m, r"model\.layers\.1\..*", False)
    lk.inject_lora(m, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    layers = lora_layers(m)
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert layers["model.layers.0.self_attn.q_proj"] is q and q.lora_A is qa and q.lora_B is qb and q.r == 4
    torch.testing.assert_close(q.lora_A.detach(), saved, rtol=0, atol=0)
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    # the adapter frozen by set_trainable stays frozen; the new ones train
    assert not layers["model.layers.1.self_attn.q_proj"].lora_A.requires_grad
    assert layers["model.layers.0.self_attn.q_proj"].lora_A.requires_grad
    assert layers["model.layers.1.self_attn.v_proj"].lora_B.requires_grad


def test_set_trainable_by_name_list_and_regex():
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(target_modules=ALL_PROJ))
    names = lk.set_trainable(m, ["q_proj", "k_proj"], False)
    assert len(names) == 4
    frozen = {n for n, layer in lora_layers(m).items() if not layer.lora_A.requires_grad}
    assert frozen == set(names) and all(re.search(r"(q|k)_proj$", n) for n in frozen)
    lk.set_trainable(m, r".*layers\.0\.self_attn\.q_proj", True)
    assert lora_layers(m)["model.layers.0.self_attn.q_proj"].lora_B.requires_grad
    with pytest.raises(ValueError, match="pattern"):
        lk.set_trainable(m, "nothing_here", True)
    with pytest.raises(ValueError, match="flag"):
        lk.set_trainable(m, "q_proj", "yes")


def test_optimizer_helper_keeps_adam_moments_of_old_parameters():
    m = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    for _ in range(2):
        opt.zero_grad()
        m(x, labels=x).loss.backward()
        opt.step()
    old = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]}
    lk.inject_lora(m, lk.LoraConfig(r=4, target_modules=["v_proj"]))
    added = lk.add_new_trainable_to_optimizer(opt, m, lr=5e-3)
    assert sorted(added) == sorted(f"model.layers.{i}.self_attn.v_proj.lora_{ab}" for i in (0, 1) for ab in "AB")
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 5e-3
    for g in opt.param_groups[:1]:
        for p in g["params"]:
            for k, v in old[id(p)].items():
                torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
    v_b = lora_layers(m)["model.layers.0.self_attn.v_proj"].lora_B
    opt.zero_grad()
    m(x, labels=x).loss.backward()
    opt.step()
    assert v_b.abs().sum() > 0  # the new parameter trains (B starts at zero)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].item() == 3  # the old ones continue their count
    assert lk.add_new_trainable_to_optimizer(opt, m) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ["nope_proj"]}, r"matched no module.*q_proj"),
    ({"target_modules": r"foo\..*"}, "matched no module"),
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "exclude_modules"),
    ({"target_modules": ["mlp"]}, "LlamaMLP"),
    ({"target_modules": ["embed_tokens"]}, "Embedding"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["no_such_head"]}, "modules_to_save"),
])
def test_bad_targets_raise_and_leave_model_alone(kwargs, match):
    m = tiny_llama()
    before = [(n, type(mod)) for n, mod in m.named_modules()]
    with pytest.raises(ValueError, match=match):
        lk.inject_lora(m, lk.LoraConfig(**kwargs))
    assert [(n, type(mod)) for n, mod in m.named_modules()] == before
    assert all(p.requires_grad for p in m.parameters())


def test_default_targets_need_a_known_model_type():
    net = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(ValueError, match="target_modules=None"):
        lk.inject_lora(net, lk.LoraConfig())


def test_bad_arguments():
    with pytest.raises(ValueError, match="config"):
        lk.inject_lora(tiny_llama(), {"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="model"):
        lk.inject_lora("model", lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="optimizer"):
        lk.add_new_trainable_to_optimizer(None, tiny_llama())


def test_plain_module_without_output_head_notion():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lk.inject_lora(net, lk.LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(lora_layers(net)) == ["0", "2"]  # PEFT, too, only skips the head of transformers models
