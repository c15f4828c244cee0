"""QLoRA integration on a tiny Llama loaded 4-bit (BitsAndBytesConfig(load_in_4bit=True) on CPU, built from a
LlamaConfig and saved to a temporary directory: no downloads): fuse_peft_model against PEFT's own QLoRA layers,
inject_lora / from_linear on bnb Linear4bit, save/load interop with PeftModel.from_pretrained, merge_and_unload as
PEFT does it, 8-bit bases reported as skipped.
"""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from tiny_models import ALL_PROJ, assert_rel_close, lk_lora_grads, peft_lora_grads, tiny_llama, tokens

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_kernels.integrations.peft import fuse_peft_model  # noqa: E402
from lora_kernels.layer_4bit import FusedLoraLinear4bit  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_4bit_base(tmp_path_factory.mktemp("tiny_llama"))


def save_tiny_4bit_base(d):
    """The tiny Llama the 4-bit PEFT comparisons load (test_dora_4bit.py too), saved to d."""
    # Rows a multiple of the 64-element quantization block: bitsandbytes 0.50's native AVX512 CPU dequantize reads
    # the wrong scale for blocks that cross rows (hidden 48 puts PEFT's reference 4x the quantization error off
    # the dense weight), which would make PEFT the wrong oracle here. Our cross-row reading is checked against
    # bnb's generic dequantize in test_qlora_dequant.py.
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(d)
    return d


def load_4bit(d, quant_type="nf4", double_quant=True):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu")


def peft_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ, lora_dropout=0.0, init_lora_weights=False,
                           **kw)


def forbid_bnb_dequantize(monkeypatch):
    """Make every bitsandbytes path that dequantizes or multiplies a 4-bit weight fail loudly."""
    def forbidden(*args, **kwargs):
        raise AssertionError("bitsandbytes dequantized the weight on the fused path")

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", forbidden)
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forbidden)


def step(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_fuse_peft_model_qlora_matches_peft(base_dir, quant_type, double_quant, monkeypatch):
    torch.manual_seed(0)
    model = peft.get_peft_model(load_4bit(base_dir, quant_type, double_quant), peft_config())
    ids = tokens()
    want_logits = step(model, ids)
    want_grads = {k: v.clone() for k, v in peft_lora_grads(model).items()}
    report = fuse_peft_model(model)
    assert len(report.fused) == 2 * len(ALL_PROJ) and not report.skipped, report
    assert all(type(m).__name__ == "FusedPeftLinear4bit" for n, m in model.named_modules() if n in report.fused)
    forbid_bnb_dequantize(monkeypatch)
    got_logits = step(model, ids)
    assert_rel_close(got_logits, want_logits, 1e-5, "logits")
    for key, g in peft_lora_grads(model).items():
        assert_rel_close(g, want_grads[key], 1e-4, str(key))


def test_inject_save_load_interop(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")   # the Triton path is covered above and in test_qlora_parity
    torch.manual_seed(0)
    model = lk.inject_lora(load_4bit(base_dir), lk.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ,
                                                              init_lora_weights=False))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lk.FusedLoraLinear)}
    assert len(layers) == 2 * len(ALL_PROJ) and all(isinstance(m, FusedLoraLinear4bit) for m in layers.values())
    assert all(m.weight.dtype == torch.uint8 for m in layers.values())   # no float copy of W anywhere
    ids = tokens()
    forbid_bnb_dequantize(monkeypatch)
    ours = step(model, ids)
    assert all(g is not None and g.abs().sum() > 0 for g in lk_lora_grads(model).values())
    monkeypatch.undo()
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    lk.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(load_4bit(base_dir), tmp_path)
    with torch.no_grad():
        assert_rel_close(peft_model(ids).logits, ours, 1e-5, "PEFT on our adapter")
        reloaded = lk.load_adapter(load_4bit(base_dir), tmp_path)
        assert_rel_close(reloaded(ids).logits, ours, 1e-6, "load_adapter")


def test_merge_and_unload_like_peft(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    torch.manual_seed(0)
    model = lk.inject_lora(load_4bit(base_dir), lk.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ,
                                                              init_lora_weights=False))
    lk.save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match="quantizes the result again"):
        lk.merge_and_unload(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is bnb.nn.Linear4bit and q_proj.weight.dtype == torch.uint8
    theirs = peft.PeftModel.from_pretrained(load_4bit(base_dir), tmp_path).merge_and_unload()
    ids = tokens()
    with torch.no_grad():
        assert_rel_close(model(ids).logits, theirs(ids).logits, 1e-5, "merged logits")


def _linear4bit(K=40, N=24, bias=True, quant_type="nf4", double_quant=True):
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                            compress_statistics=double_quant)
    return lin.to("cpu")   # Params4bit quantizes when moved to a device


def test_from_linear4bit_layer_holds_half_a_byte_per_weight():
    lin = _linear4bit(K=256, N=64)
    layer = lk.FusedLoraLinear.from_linear(lin, r=4, init_lora_weights=False)
    assert isinstance(layer, FusedLoraLinear4bit) and layer.weight is lin.weight and layer.bias is lin.bias
    assert (layer.in_features, layer.out_features) == (256, 64) and layer.lora_A.dtype == torch.float32
    qs = layer.weight.quant_state
    base_bytes = sum(t.numel() * t.element_size() for t in (layer.weight, qs.absmax, qs.state2.absmax,
                                                            qs.state2.code, qs.code))
    # 0.5 B per weight + one uint8 absmax per 64 + a float32 per 256 absmaxes + the code tables (2 KB: small W)
    assert base_bytes / (256 * 64) < 0.5 + 1 / 64 + 0.07
    sd = layer.state_dict()
    assert "weight.quant_state.bitsandbytes__nf4" in sd and "weight.absmax" in sd   # bnb's own keys
    x = torch.randn(5, 256)
    want = lin(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert_rel_close(layer(x), want.detach(), 1e-5, "forward")
    with layer.disable_adapter():
        assert_rel_close(layer(x), lin(x).detach(), 1e-6, "disabled")
    assert type(lk.unload(nn.Sequential(layer))[0]) is bnb.nn.Linear4bit


def test_4bit_layer_refuses_several_adapters_and_mixed_batches():
    """The segmented multi-adapter kernels do not read a 4-bit W: refused with a clear error, never computed wrong."""
    model = nn.Sequential(_linear4bit())
    lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="4-bit .* holds one adapter"):
        lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["0"]), adapter_name="second")
    with pytest.raises(ValueError, match="4-bit .* holds one adapter"):
        with lk.batch_adapters(model, ["default", None]):
            model(torch.randn(2, 3, 40))


def test_8bit_bases_are_reported_skipped():
    lin8 = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    with pytest.raises(ValueError, match="8-bit bitsandbytes bases"):
        lk.FusedLoraLinear.from_linear(lin8)
    base = nn.Sequential(lin8, _linear4bit(16, 8, bias=False))
    base.is_loaded_in_8bit = base.is_loaded_in_4bit = True   # what transformers sets; PEFT then uses lora.bnb.*
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "1"]))
    assert type(model.base_model.model[0]).__name__ == "Linear8bitLt"   # PEFT's lora.bnb.Linear8bitLt
    report = fuse_peft_model(model)
    assert [n.rsplit(".", 1)[-1] for n in report.fused] == ["1"]
    (name, reason), = report.skipped.items()
    assert name.endswith(".0") and "Linear8bitLt" in reason


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_4bit_layer_fullgraph_compile(backend, monkeypatch):
    """The module path (Params4bit -> QuantizedWeight inside forward) traces without graph breaks."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    layer = lk.FusedLoraLinear.from_linear(_linear4bit(), r=4, init_lora_weights=False, lora_dropout=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, layer):
        x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        layer.zero_grad()
        torch.manual_seed(1)
        y = fn(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def _peft_4bit_pair(**cfg):
    """Two identical PEFT models over one bnb Linear4bit base (lora.bnb.Linear4bit layers): (to fuse, reference)."""
    models = []
    for _ in range(2):
        base = nn.Sequential(_linear4bit(40, 24))
        base.is_loaded_in_4bit = True   # what transformers sets; PEFT then uses lora.bnb.Linear4bit
        torch.manual_seed(3)
        models.append(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                init_lora_weights=False, **cfg)))
    return models


def test_fused_peft_4bit_keeps_peft_repr_and_layer_status():
    model, reference = _peft_4bit_pair()
    layer = model.base_model.model[0]
    peft_repr = repr(layer)
    assert peft_repr.startswith("lora.Linear4bit(")
    report = fuse_peft_model(model)
    assert len(report.fused) == 1 and type(layer).__name__ == "FusedPeftLinear4bit"
    assert repr(layer).startswith("lora.Linear4bit(\n  fused=lora_kernels\n")
    assert repr(layer).replace("  fused=lora_kernels\n", "") == peft_repr
    assert model.get_layer_status() == reference.get_layer_status()


def test_fused_peft_4bit_per_call_fallback_and_lora_bias(monkeypatch):
    """The 4-bit layer follows the dense layer's per-call rules (here: a hook on base_layer runs PEFT's forward)
    and serves lora_bias on the kernels."""
    import lora_kernels.integrations.peft as lk_peft

    model, reference = _peft_4bit_pair(lora_bias=True)
    with torch.no_grad():
        for m in (model, reference):
            m.base_model.model[0].lora_B["default"].bias.copy_(torch.linspace(-1, 1, 24))
    fuse_peft_model(model)
    calls = []
    real = lk_peft.fused_lora_linear
    monkeypatch.setattr(lk_peft, "fused_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 40)
    with torch.no_grad():
        want = reference(x)
        assert_rel_close(model(x), want, 1e-5, "fused, lora_bias")
        assert len(calls) == 1
        handle = model.base_model.model[0].base_layer.register_forward_hook(lambda mod, inp, out: None)
        assert_rel_close(model(x), want, 1e-6, "hooked: PEFT's forward")
        assert len(calls) == 1
        handle.remove()
        model(x)
        assert len(calls) == 2


def test_fused_peft_4bit_reads_the_quant_state_kept_on_the_module():
    """Under FSDP2 the base's weight is, during forward, the all-gathered packed bytes as a plain tensor without
    bnb's quant_state; the fused layer pairs them with the quant state bitsandbytes keeps on the Linear4bit module
    (as on one device). Here the swap is done by hand; integrations/torchrun_ddp_fsdp.py runs it under fully_shard."""
    model, reference = _peft_4bit_pair()
    fuse_peft_model(model)
    base = model.base_model.model[0].base_layer
    x = torch.randn(5, 40)
    with torch.no_grad():
        want = reference(x)
        base.weight = nn.Parameter(base.weight.data.clone(), requires_grad=False)   # what fully_shard leaves
        assert getattr(base.weight, "quant_state", None) is None and base.quant_state is not None
        assert_rel_close(model(x), want, 1e-5, "packed bytes + the module's quant state")
