"""DoRA (use_dora=True) against PEFT's own DoRA on a tiny Llama: logits, loss and the gradients of A, B and m at
p = 0 and at p = 0.1 with the same mask (PEFT's dropout modules replaced by one applying our torch-backend mask,
drawn from the same seed in the same order), PEFT's files both ways, merge / unmerge / merge_and_unload,
disable_adapter, and the refusals (mixed batches, mixing DoRA and plain adapters on a layer)."""
import copy
import json
import os

import peft
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.backends.base import draw_seed
from lora_kernels.backends.torch import torch_keep_mask
from lora_kernels.inject import lora_layers
from tests.tiny_models import ALL_PROJ, assert_rel_close, peft_lora_names, tiny_llama, tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SeededMaskDropout(nn.Module):
    """PEFT's dropout replaced by ours: one seed drawn per call, the torch backend's keep-mask from it."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        keep = torch_keep_mask(int(draw_seed(x.device).item()), x.shape, self.p, x.device)
        return x * keep.to(x.dtype) / (1.0 - self.p)


def _peft_dora(p=0.0, seed=0):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                              target_modules=ALL_PROJ, use_dora=True,
                                                              init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    for layer in peft_lora_names(model).values():
        m = layer.lora_magnitude_vector["default"].weight
        m.data.mul_(torch.rand(m.shape, generator=g) + 0.5)  # g ≠ 1, so the magnitude matters
        if p > 0:
            layer.lora_dropout["default"] = SeededMaskDropout(p)
    return model


def _peft_grads(model):
    out = {}
    for name, layer in peft_lora_names(model).items():
        out[(name, "lora_A")] = layer.lora_A["default"].weight.grad
        out[(name, "lora_B")] = layer.lora_B["default"].weight.grad
        out[(name, "m")] = layer.lora_magnitude_vector["default"].weight.grad
    return out


def _lk_grads(model):
    out = {}
    for name, layer in lora_layers(model).items():
        out[(name, "lora_A")], out[(name, "lora_B")] = layer.lora_A.grad, layer.lora_B.grad
        out[(name, "m")] = layer.lora_magnitude_vector.grad
    return out


def _step(model, ids):
    torch.manual_seed(123)  # the same dropout seeds, drawn layer by layer in the same order
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def assert_step_matches_peft(pm, ours):
    """One training step of PEFT's model and ours on the same tokens: logits, loss and every A, B, m gradient.
    Returns the tokens and PEFT's logits."""
    ids = tokens()
    (logits_p, loss_p), (logits_o, loss_o) = _step(pm, ids), _step(ours, ids)
    assert_rel_close(logits_o, logits_p, 1e-5, "logits")
    assert_rel_close(loss_o, loss_p, 1e-5, "loss")
    gp, go = _peft_grads(pm), _lk_grads(ours)
    assert gp.keys() == go.keys()
    for k in gp:
        assert_rel_close(go[k], gp[k], 1e-4, str(k))
    return ids, logits_p


def fuse_and_match_peft_step(ref, fused, monkeypatch):
    """fuse_peft_model(fused), with a spy on the fused DoRA forward, then one training step of ref (PEFT's own
    DoRA layers) and fused on the same tokens: every layer fused and served by it, equal logits, loss and A, B, m
    gradients. Returns the tokens, fused's logits and the spy's calls."""
    from lora_kernels.integrations import peft as lk_peft
    from lora_kernels.integrations.peft import fuse_peft_model

    calls = []
    real = lk_peft.dora_forward
    monkeypatch.setattr(lk_peft, "dora_forward", lambda *a: calls.append(1) or real(*a))
    report = fuse_peft_model(fused)
    assert len(report.fused) == 2 * len(ALL_PROJ) and not report.skipped, report
    ref.train(), fused.train()
    ids = tokens()
    (logits_r, loss_r), (logits_f, loss_f) = _step(ref, ids), _step(fused, ids)
    assert len(calls) == 2 * len(ALL_PROJ)
    assert_rel_close(logits_f, logits_r, 1e-5, "logits")
    assert_rel_close(loss_f, loss_r, 1e-5, "loss")
    gr, gf = _peft_grads(ref), _peft_grads(fused)
    for k in gr:
        assert_rel_close(gf[k], gr[k], 1e-4, str(k))
    return ids, logits_f, calls


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_loads_peft_dora_and_matches_outputs_and_grads(p, tmp_path, torch_backend):
    pm = _peft_dora(p)
    pm.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["use_dora"] is True
    ours = lk.load_adapter(tiny_llama(), tmp_path)
    layers = lora_layers(ours)
    assert len(layers) == 2 * len(ALL_PROJ) and all(isinstance(v, lk.FusedDoraLinear) for v in layers.values())
    assert layers["model.layers.0.self_attn.q_proj"].lora_dropout == p
    pm.train(), ours.train()
    ids, logits_p = assert_step_matches_peft(pm, ours)
    if p > 0:  # the dropout mattered: the eval output differs from the training one
        pm.eval()
        with torch.no_grad():
            assert not torch.allclose(pm(input_ids=ids).logits, logits_p, atol=1e-4)


def test_saved_dora_loads_in_peft(tmp_path, torch_backend):
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ, use_dora=True,
                                                       init_lora_weights=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_magnitude_vector.mul_(torch.rand(layer.out_features, generator=g) + 0.5)
    lk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in keys
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert pm.peft_config["default"].use_dora
    model.eval(), pm.eval()
    ids = tokens()
    with torch.no_grad():
        assert_rel_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, 1e-5, "logits")
        with lk.disable_adapter(model):
            assert_rel_close(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, 1e-6, "disabled")
        # PEFT's merge rule: merged logits equal ours merged, and equal the unmerged ones.
        want = model(input_ids=ids).logits
        layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
        w0 = layer.weight.detach().clone()
        layer.merge()
        assert not torch.allclose(layer.weight, w0)
        layer.unmerge()
        torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-5, atol=1e-6)
        merged = lk.merge_and_unload(model)
        assert not lora_layers(merged)
        peft_merged = pm.merge_and_unload()
        assert_rel_close(merged(input_ids=ids).logits, want, 1e-5, "merged")
        for (n, a), b in zip(merged.named_parameters(), peft_merged.parameters()):
            assert_rel_close(a, b, 1e-5, n)


def test_dora_layer_and_its_norm_cache(torch_backend):
    """A new DoRA layer equals its base (m = ‖W‖ at PEFT's init); ‖W‖² is recomputed when W changes in place."""
    lin = nn.Linear(12, 9)
    layer = lk.FusedDoraLinear.from_linear(lin, r=2)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
    assert "dora" in repr(layer) and layer.peft_tensors("default").keys() == {
        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    first = layer.weight_sq_norm()
    assert layer.weight_sq_norm() is first
    with torch.no_grad():
        layer.weight.mul_(2.0)
    torch.testing.assert_close(layer.weight_sq_norm(), 4 * first)


def test_refusals(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA adapters .*not supported yet"):
        with lk.batch_adapters(model, ["default", None]):
            pass
    with pytest.raises(ValueError, match="DoRA adapters only or plain ones only"):
        lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="plain")
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        lk.LoraConfig(use_dora="yes")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises((ValueError, RuntimeError), match="cuda|CUDA"):
        model(input_ids=tokens())


def test_second_dora_adapter(torch_backend):
    """A second DoRA adapter on the same layers: its own magnitude, selected by set_adapter."""
    model = lk.inject_lora(tiny_llama(), lk.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True,
                                                       init_lora_weights=False))
    lk.inject_lora(model, lk.LoraConfig(r=3, target_modules=["v_proj"], use_dora=True, init_lora_weights=False),
                   adapter_name="b")
    layer = lora_layers(model)["model.layers.0.self_attn.v_proj"]
    assert tuple(layer.lora_magnitude_vectors["b"].shape) == (layer.out_features,)
    ids = tokens()
    with torch.no_grad():
        ya = model(input_ids=ids).logits
        lk.set_adapter(model, "b")
        yb = model(input_ids=ids).logits
    assert not torch.allclose(ya, yb)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_activations_against_peft(p, torch_backend):
    """Bytes saved for backward by one DoRA layer (x counted once, parameters not): at most 0.6× PEFT's."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["0"], use_dora=True,
                                                                   lora_dropout=p))
    ours = lk.inject_lora(copy.deepcopy(base), lk.LoraConfig(r=8, target_modules=["0"], use_dora=True,
                                                             lora_dropout=p))
    x = torch.randn(128, 64, requires_grad=True)
    params = {q.untyped_storage().data_ptr() for m in (pm, ours) for q in m.parameters()}
    saved = {}
    for name, model in (("peft", pm), ("ours", ours)):
        model.train()
        seen = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        saved[name] = sum(seen.values())
    assert saved["ours"] <= 0.6 * saved["peft"], saved


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fuse_peft_model_serves_dora(p, torch_backend, monkeypatch):
    """fuse_peft_model runs PEFT's DoRA layers on fused_dora_linear with PEFT's outputs and gradients (p = 0.1:
    the reference's dropout applies the mask the fused layers draw). With PEFT's DoRA caching on, PEFT's forward
    runs (its eval-mode norm cache kept as PEFT has it)."""
    from peft.tuners.lora import dora

    ref = _peft_dora(p)
    fused = _peft_dora(0.0)
    fused.load_state_dict(ref.state_dict())
    for layer in peft_lora_names(fused).values():
        layer.lora_dropout["default"] = nn.Dropout(p) if p > 0 else nn.Identity()
    ids, _, calls = fuse_and_match_peft_step(ref, fused, monkeypatch)
    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)
    fused.eval()
    with torch.no_grad():
        fused(input_ids=ids)
    assert len(calls) == 2 * len(ALL_PROJ)


def test_gpt2_conv1d_dora_loads_merges_and_fuses(tmp_path, torch_backend):
    """GPT-2's Conv1D (weight (in, out), fan_in_fan_out): PEFT's DoRA file loads with equal logits and m's
    gradient, merges as PEFT merges, and fuse_peft_model serves it."""
    transformers = pytest.importorskip("transformers")
    from lora_kernels.integrations.peft import fuse_peft_model

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    pm = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True,
                                                     init_lora_weights=False, fan_in_fan_out=True))
    with torch.no_grad():
        for layer in peft_lora_names(pm).values():
            layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    pm.save_pretrained(tmp_path)
    ours = lk.load_adapter(gpt2(), tmp_path)
    assert all(layer.fan_in_fan_out for layer in lora_layers(ours).values())
    pm.eval(), ours.eval()
    out_p, out_o = pm(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_rel_close(out_o.logits, out_p.logits, 1e-5, "logits")
    out_p.loss.backward(), out_o.loss.backward()
    gp = {k: v for k, v in _peft_grads(pm).items() if k[1] == "m"}
    go = {k: v for k, v in _lk_grads(ours).items() if k[1] == "m"}
    for k in gp:
        assert_rel_close(go[k], gp[k], 1e-4, str(k))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        fuse_peft_model(pm)
        assert_rel_close(pm(input_ids=ids).logits, want, 1e-5, "fused")
        merged_o = lk.merge_and_unload(ours)
        merged_p = pm.merge_and_unload()
        for (n, a), b in zip(merged_o.named_parameters(), merged_p.parameters()):
            assert_rel_close(a, b, 1e-5, n)


def test_bert_dora_matches_peft_and_apply_fused_lora(tmp_path, torch_backend):
    """A tiny BERT classifier: PEFT's DoRA adapter loads with equal logits, loss and gradients of A, B and m;
    apply_fused_lora(use_dora=True) builds DoRA layers."""
    transformers = pytest.importorskip("transformers")
    from lora_kernels.integrations.transformers import apply_fused_lora

    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))

    pm = peft.get_peft_model(bert(), peft.LoraConfig(r=4, target_modules=["query", "value", "dense"],
                                                     use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for layer in peft_lora_names(pm).values():
            layer.lora_magnitude_vector["default"].weight.mul_(0.8)
    pm.save_pretrained(tmp_path)
    ours = lk.load_adapter(bert(), tmp_path)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1])
    pm.train(), ours.train()
    out_p, out_o = pm(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    assert_rel_close(out_o.logits, out_p.logits, 1e-5, "logits")
    out_p.loss.backward(), out_o.loss.backward()
    gp, go = _peft_grads(pm), _lk_grads(ours)
    assert gp.keys() == go.keys()
    for k in gp:
        assert_rel_close(go[k], gp[k], 1e-4, str(k))
    model = apply_fused_lora(bert(), r=2, target_modules=["query"], use_dora=True)
    assert all(isinstance(layer, lk.FusedDoraLinear) for layer in lora_layers(model).values())


def test_triton_launches(monkeypatch):
    """One DoRA layer on the Triton backend: forward = shrink + one GEMM pass; backward = the two LoRA backward
    kernels, plus the two-MMA grad_x pass with dropout (whose LoRA pass then computes no grad_x)."""
    from lora_kernels.ops import dora_linear_bwd_dx, dora_linear_fwd, lora_dy_b, lora_linear_bwd_dx, lora_shrink

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    calls = []
    for mod, name in ((lora_shrink, "_lora_shrink_kernel"), (dora_linear_fwd, "_dora_linear_fwd_kernel"),
                      (lora_dy_b, "_lora_dy_b_kernel"), (lora_linear_bwd_dx, "_lora_linear_bwd_dx_kernel"),
                      (dora_linear_bwd_dx, "_dora_bwd_dx_kernel")):
        kernel = getattr(mod, name)

        class Counting:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                calls.append(self.n)
                return self.k[grid]

        monkeypatch.setattr(mod, name, Counting(kernel, name))
    layer = lk.FusedDoraLinear(24, 20, r=4, init_lora_weights=False)
    for p, want in ((0.0, ["_lora_shrink_kernel", "_dora_linear_fwd_kernel", "_lora_dy_b_kernel",
                           "_lora_linear_bwd_dx_kernel"]),
                    (0.2, ["_lora_shrink_kernel", "_dora_linear_fwd_kernel", "_lora_dy_b_kernel",
                           "_lora_linear_bwd_dx_kernel", "_dora_bwd_dx_kernel"])):
        layer.lora_dropout = p
        calls.clear()
        x = torch.randn(2, 5, 24, requires_grad=True)
        layer(x).sum().backward()
        assert calls == want, (p, calls)



@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_base_fp32_adapters_match_peft(p, tmp_path, torch_backend):
    """A bfloat16 base with float32 adapters (PEFT's autocast_adapter_dtype default) under two DoRA layers: we
    compute in the activation dtype (bf16), PEFT's adapter branch in float32. Outputs and the gradients of x, A, B
    and m agree with PEFT at bfloat16's tolerance (reference.TOL), and neither is further from the float32 model
    (the same adapter on the base's values in float32) than that. (A deep model would compare bf16 noise
    amplified through its layers, not the layers.)"""
    from lora_kernels.reference import TOL

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 40)).to(torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                   target_modules=["0", "2"], use_dora=True,
                                                                   init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    for layer in peft_lora_names(pm).values():
        m = layer.lora_magnitude_vector["default"].weight
        assert m.dtype == layer.lora_A["default"].weight.dtype == torch.float32
        m.data.mul_(torch.rand(m.shape, generator=g) + 0.5)
    pm.save_pretrained(tmp_path)
    fp32 = peft.PeftModel.from_pretrained(copy.deepcopy(base).float(), tmp_path, is_trainable=True)
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path)
    layer = lora_layers(ours)["0"]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_magnitude_vector.dtype \
        == torch.float32
    if p > 0:
        for model in (pm, fp32):
            for layer in peft_lora_names(model).values():
                layer.lora_dropout["default"] = SeededMaskDropout(p)
    x = torch.randn(2, 9, 64, generator=g)
    runs = {}
    for name, model, dtype in (("peft", pm, torch.bfloat16), ("ours", ours, torch.bfloat16),
                               ("fp32", fp32, torch.float32)):
        model.train()
        xx = x.to(dtype).requires_grad_(True)
        torch.manual_seed(5)   # the same masks, layer by layer
        y = model(xx)
        y.float().square().sum().backward()
        grads = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", ""): q.grad
                 for n, q in model.named_parameters() if q.grad is not None}
        runs[name] = {"y": y.detach(), "x": xx.grad, **grads}
    assert runs["ours"].keys() == runs["peft"].keys() and len(runs["ours"]) == 2 + 2 * 3
    tol = TOL[torch.bfloat16]
    for k in runs["peft"]:
        assert runs["ours"][k].dtype == runs["peft"][k].dtype, k
        assert_rel_close(runs["ours"][k], runs["peft"][k], tol, f"{k} vs PEFT")
        for who in ("ours", "peft"):
            assert_rel_close(runs[who][k], runs["fp32"][k], tol, f"{k}: {who} vs float32")
