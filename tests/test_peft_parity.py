"""Parity of fuse_peft_model with PEFT itself over a matrix of LoraConfig settings, on a small custom network and a
tiny Llama built from a config: outputs and gradients of the fused model equal those of the same model on PEFT's
own forward (float32), and PEFT's adapter switching, merging, disabling and saving behave the same when fused.

Dropout is the one place the two differ by design: our mask comes from a Philox stream, PEFT's from torch's
dropout. There the tests check what must hold of both: the kept fraction, the 1/(1-p) rescaling of kept entries,
a mask that depends on the seed only (reproducible, linear in lora_B), and gradients computed with the very mask
the forward used.

Most cases run on the torch backend (fast); the ones marked `interpreter` run the Triton kernels under
TRITON_INTERPRET=1 on CPU."""
import copy

import peft
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from lora_kernels.integrations.peft import FusedPeftLinear, fuse_peft_model, unfuse_peft_model
from lora_kernels.reference import lora_linear_reference


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attn_proj = nn.Linear(d, d)
        self.mlp_up = nn.Linear(d, h)
        self.mlp_down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        x = x + torch.tanh(self.attn_proj(x))
        return x + self.mlp_down(torch.nn.functional.gelu(self.mlp_up(x)))


class Net(nn.Module):
    """Nested names, so that list and regex targets pick different subsets."""

    def __init__(self, d_in=10, d=16, h=24, d_out=5):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([Block(d, h), Block(d, h)])
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, attention_bias=True,
                      mlp_bias=True)
    return LlamaForCausalLM(cfg)


MODELS = {"net": net, "llama": llama}


def _inputs(kind, batch=2, seq=6):
    g = torch.Generator().manual_seed(11)
    if kind == "net":
        return torch.randn(batch, seq, 10, generator=g)
    return torch.randint(0, 64, (batch, seq), generator=g)


def _peft(kind, seed=0, **cfg):
    args = dict(r=4, lora_alpha=8, init_lora_weights=False)
    args.update(cfg)
    return peft.get_peft_model(MODELS[kind](seed), peft.LoraConfig(**args))


def _run(pm, kind, inputs):
    """(output, {name: grad}) of one forward and backward; the net's loss is a fixed random projection."""
    pm.zero_grad(set_to_none=True)
    if kind == "net":
        x = inputs.clone().requires_grad_(True)
        out = pm(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out * w).sum().backward()
        grads = {"input": x.grad}
    else:
        res = pm(input_ids=inputs, labels=inputs)
        res.loss.backward()
        out, grads = res.logits, {}
    grads.update({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _assert_close(got, want, rel, what):
    """Max error at most `rel` times the largest magnitude of `want`: the fused and PEFT's matmuls round in
    different orders, so a gradient entry near zero is compared at the tensor's scale."""
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


def _assert_same_run(got, want, rel):
    (out, grads), (want_out, want_grads) = got, want
    _assert_close(out, want_out, rel, "output")
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        _assert_close(g, want_grads[name], rel, name)


def _assert_parity(pm, kind, inputs, calls, rel=1e-5):
    """The model on PEFT's forward, then fused: equal outputs and gradients, and every LoRA layer on the kernels.
    Returns the fused output."""
    unfuse_peft_model(pm)
    want = _run(pm, kind, inputs)
    report = fuse_peft_model(pm)
    assert report.fused and not report.skipped, report
    del calls[:]
    got = _run(pm, kind, inputs)
    assert len(calls) == len(report.fused)
    _assert_same_run(got, want, rel)
    return got[0]


# -- the configuration matrix -------------------------------------------------------------------------------

CASES = {
    "list": ("net", dict(target_modules=["embed", "attn_proj", "mlp_down"])),
    "regex": ("net", dict(target_modules=r"blocks\.\d+\.mlp_(up|down)")),
    "bias-all": ("net", dict(target_modules=["attn_proj", "head"], bias="all")),
    "bias-lora-only": ("net", dict(target_modules=["attn_proj", "mlp_down", "head"], bias="lora_only")),
    "rslora": ("net", dict(target_modules=["mlp_up", "mlp_down"], r=3, lora_alpha=5, use_rslora=True)),
    "patterns": ("net", dict(target_modules=["embed", "mlp_up", "head"], rank_pattern={"blocks.1.mlp_up": 2},
                             alpha_pattern={"head": 3})),
    "lora-bias": ("net", dict(target_modules=["attn_proj", "head"], lora_bias=True)),
    "dropout-eval": ("net", dict(target_modules=["embed", "mlp_up"], lora_dropout=0.3)),
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "llama-list-bias-rslora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], bias="lora_only",
                                             use_rslora=True, r=2)),
    "llama-regex-dropout-eval": ("llama", dict(target_modules=r".*\.(k_proj|up_proj)", lora_dropout=0.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_matrix_torch_backend(case, monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    kind, cfg = CASES[case]
    pm = _peft(kind, **cfg)
    if cfg.get("lora_bias"):
        for m in pm.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                nn.init.normal_(m.lora_B["default"].bias)  # PEFT starts it at zero
    if "dropout" in case:
        pm.eval()  # no dropout: equality holds; training-mode dropout is checked below
    _assert_parity(pm, kind, _inputs(kind), count_kernel_calls)


@pytest.mark.parametrize("case", ["bias-all", "rslora", "llama-list-bias-rslora"])
def test_config_matrix_interpreter(case, count_kernel_calls):
    kind, cfg = CASES[case]
    pm = _peft(kind, **cfg)
    # the interpreter's fp32 dots accumulate in another order than torch's matmul
    _assert_parity(pm, kind, _inputs(kind, batch=1, seq=5), count_kernel_calls, rel=1e-4)


# -- adapters: switching, several active, merging, disabling, saving ----------------------------------------

SECOND = dict(r=2, lora_alpha=3, target_modules=["mlp_up", "head"], use_rslora=True, init_lora_weights=False)


def test_set_adapter_after_fusing(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft("net", target_modules=["attn_proj", "mlp_up"])
    pm.add_adapter("second", peft.LoraConfig(**SECOND))
    pm.set_adapter("second")
    reference = copy.deepcopy(pm)
    # fused while "second" is active: the attn_proj layers hold only "default" and are fused all the same
    report = fuse_peft_model(pm)
    assert len(report.fused) == 5 and not report.skipped
    x = _inputs("net")
    outs = {}
    for name, n_layers in (("default", 4), ("second", 3), ("default", 4)):
        pm.set_adapter(name)
        reference.set_adapter(name)
        del count_kernel_calls[:]
        got = _run(pm, "net", x)
        assert len(count_kernel_calls) == n_layers
        _assert_same_run(got, _run(reference, "net", x), rel=1e-5)
        outs[name] = got[0]
    assert not torch.allclose(outs["default"], outs["second"])


def test_active_adapters_on_disjoint_layers_are_each_fused(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft("net", target_modules=["attn_proj"])
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])  # each layer holds one of them: PEFT runs that one
    _assert_parity(pm, "net", _inputs("net"), count_kernel_calls)


def test_a_wrapped_tuner_layer_stays_on_peft_path(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    torch.manual_seed(0)
    # a mixed model stacks a LoRA layer on a LoHa layer: the LoRA layer's base_layer adds LoHa's own delta
    pm = peft.get_peft_model(Net(), peft.LoHaConfig(r=2, target_modules=["head"], init_weights=False), mixed=True)
    pm.add_adapter("lora", peft.LoraConfig(r=2, target_modules=["head", "embed"], init_lora_weights=False))
    pm.set_adapter(["default", "lora"])
    x = _inputs("net")
    with torch.no_grad():
        want = pm(x)
        report = fuse_peft_model(pm)
        assert report.fused == ["base_model.model.embed"]
        assert "loha" in report.skipped["base_model.model.head"].lower()
        torch.testing.assert_close(pm(x), want, rtol=1e-6, atol=1e-6)
    assert len(count_kernel_calls) == 1


def test_merge_unmerge_and_merge_and_unload(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft("llama", target_modules=["q_proj", "o_proj", "up_proj"]).eval()
    x = _inputs("llama")
    fuse_peft_model(pm)
    with torch.no_grad():
        fused = pm(x).logits
        assert len(count_kernel_calls) == 3
        pm.merge_adapter()
        merged = pm(x).logits
        assert len(count_kernel_calls) == 3  # merged: PEFT's path, the base layer holds the delta
        torch.testing.assert_close(merged, fused, rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(x).logits, fused, rtol=1e-5, atol=1e-5)
        assert len(count_kernel_calls) == 6
        unloaded = pm.merge_and_unload()
        assert not any(isinstance(m, (FusedPeftLinear, peft.tuners.lora.LoraLayer)) for m in unloaded.modules())
        torch.testing.assert_close(unloaded(x).logits, fused, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_the_base_model(monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    x = _inputs("net")
    with torch.no_grad():
        base_out = net()(x)
    pm = _peft("net", target_modules=["embed", "mlp_down", "head"], bias="lora_only")
    fuse_peft_model(pm)
    with torch.no_grad():
        fused = pm(x)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), base_out, rtol=0, atol=0)
        assert len(count_kernel_calls) == 4
        torch.testing.assert_close(pm(x), fused, rtol=0, atol=0)
    assert len(count_kernel_calls) == 8


def test_save_pretrained_from_pretrained_roundtrip(tmp_path, monkeypatch, count_kernel_calls):
    from safetensors.torch import load_file

    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    pm = _peft("net", target_modules=["attn_proj", "mlp_up"], bias="lora_only")
    pm.add_adapter("second", peft.LoraConfig(**SECOND))
    x = _inputs("net")
    unfused_dir, fused_dir = tmp_path / "unfused", tmp_path / "fused"
    pm.save_pretrained(unfused_dir, selected_adapters=["default", "second"])
    fuse_peft_model(pm)
    pm.save_pretrained(fused_dir, selected_adapters=["default", "second"])
    # file for file what PEFT writes: same keys, same tensors, same config
    for sub in ("", "second"):
        a, b = (load_file(d / sub / "adapter_model.safetensors") for d in (unfused_dir, fused_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        configs = [(d / sub / "adapter_config.json").read_text() for d in (unfused_dir, fused_dir)]
        assert configs[0] == configs[1]
    loaded = peft.PeftModel.from_pretrained(net(), fused_dir)
    loaded.load_adapter(fused_dir / "second", adapter_name="second")
    fuse_peft_model(loaded)
    pm.eval()
    loaded.eval()
    with torch.no_grad():
        for name in ("default", "second"):
            pm.set_adapter(name)
            loaded.set_adapter(name)
            torch.testing.assert_close(loaded(x), pm(x), rtol=0, atol=0)
    assert len(count_kernel_calls) == 2 * (4 + 3)  # "default" on 4 layers, "second" on 3, in both models


# -- dropout (training mode, p > 0) -------------------------------------------------------------------------

def _identity_lora(p, K=16):
    """One PEFT LoRA layer with r = in = out = K and lora_A = lora_B = I: its LoRA term is s·dropout(x) itself,
    so the mask can be read off the output. Returns (peft model, layer)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(K, K)),
                             peft.LoraConfig(r=K, lora_alpha=2 * K, target_modules=["0"], lora_dropout=p))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.eye(K))
        layer.lora_B["default"].weight.copy_(torch.eye(K))
    return pm.train(), layer


def _lora_term(pm, layer, x, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return pm(x) - layer.base_layer(x)


def _x_away_from_zero(rows=48, K=16):
    """|x| in [1, 2]: a kept entry of the LoRA term is then at least the scaling, a dropped one is 0 up to the
    rounding of the base GEMM (which the kernels compute in their own order)."""
    g = torch.Generator().manual_seed(2)
    return (1 + torch.rand(rows, K, generator=g)) * torch.randn(rows, K, generator=g).sign()


def _kept(term, layer):
    return term.abs() > 0.5 * layer.scaling["default"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("auto", id="interpreter")])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics_match_peft(backend, p, monkeypatch, count_kernel_calls):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    pm, layer = _identity_lora(p)
    s = layer.scaling["default"]
    x = _x_away_from_zero()
    n = x.numel()
    bound = 5 * (p * (1 - p) / n) ** 0.5

    def check(term):
        kept = _kept(term, layer)
        assert abs(kept.float().mean().item() - (1 - p)) < bound
        # kept entries carry exactly x/(1-p): inverted dropout, unbiased in expectation
        torch.testing.assert_close(term[kept], (s * x / (1 - p))[kept], rtol=1e-5, atol=1e-5)
        return kept

    check(_lora_term(pm, layer, x, seed=0))  # PEFT's own dropout
    fuse_peft_model(pm)
    kept = check(_lora_term(pm, layer, x, seed=0))
    assert len(count_kernel_calls) == 1
    # the mask is a function of torch's seed: reproducible with it, different without
    assert torch.equal(_kept(_lora_term(pm, layer, x, seed=0), layer), kept)
    assert not torch.equal(_kept(_lora_term(pm, layer, x, seed=1), layer), kept)
    # eval mode: no mask at all
    pm.eval()
    assert _kept(_lora_term(pm, layer, x, seed=0), layer).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("auto", id="interpreter")])
def test_dropout_gradients_use_the_forward_mask(backend, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    p = 0.3
    pm, layer = _identity_lora(p)
    fuse_peft_model(pm)
    x = _x_away_from_zero()
    kept = _kept(_lora_term(pm, layer, x, seed=4), layer)
    # now the same seed with gradients; compare with the formula under the recovered mask, in float64
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(48, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    (pm(xg) * dy).sum().backward()
    d = {k: t.detach().double().requires_grad_(True) for k, t in (("x", x), ("A", A), ("B", B))}
    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    ref = lora_linear_reference(d["x"], W, b, d["A"], d["B"], layer.scaling["default"], keep_mask=kept, dropout_p=p)
    (ref * dy.double()).sum().backward()
    for name, got in (("x", xg.grad), ("A", A.grad), ("B", B.grad)):
        _assert_close(got.double(), d[name].grad, 1e-5, name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("auto", id="interpreter")])
def test_dropout_output_is_linear_in_lora_B(backend, monkeypatch, count_kernel_calls):
    """With the seed fixed the mask is fixed, so the LoRA term is linear in lora_B (the mask does not depend on
    the weights)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(12, 9)),
                             peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.25,
                                             init_lora_weights=False)).train()
    layer = pm.base_model.model[0]
    fuse_peft_model(pm)
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(2))
    B = layer.lora_B["default"].weight
    B1, B2 = torch.randn_like(B), torch.randn_like(B)

    def term(b, seed=0):
        with torch.no_grad():
            B.copy_(b)
        return _lora_term(pm, layer, x, seed)

    torch.testing.assert_close(term(B1 + 2 * B2), term(B1) + 2 * term(B2), rtol=1e-5, atol=1e-5)
    assert len(count_kernel_calls) == 3
