"""LoRA on MoE experts (PEFT's target_parameters): the grouped torch Function against a float64 per-pair oracle,
the experts layer against PEFT on tiny models built from configs (Qwen3-MoE, Mixtral, OLMoE, gpt-oss), PEFT's
on-disk format both ways, merge / unmerge / disable, and what is refused."""
import copy

import pytest
import torch
from helpers import set_checkpointing

import lora_kernels as lk
from lora_kernels.backends.base import draw_seed
from lora_kernels.backends.torch import torch_keep_mask
from lora_kernels.functional import ExpertRouting, fused_grouped_lora_linear
from lora_kernels.inject import lora_layers
from lora_kernels.layers import FusedLoraExperts
from lora_kernels.reference import grouped_lora_reference

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


# -- the grouped Function ---------------------------------------------------------------------------------

def _uneven_routing(T, k, E):
    """Expert 0 gets no pair, expert 1 one pair, the last expert many (the first slot of most tokens)."""
    idx = torch.empty(T, k, dtype=torch.long)
    for t in range(T):
        row = [E - 1] + [2 + (t + j) % (E - 2) for j in range(k - 1)] if t else [1] + [E - 1] * (k - 1)
        idx[t] = torch.tensor(row[:k])
    assert not (idx == 0).any() and int((idx == 1).sum()) == 1
    return idx


def _case(T, k, E, fin, fout, r, bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w = rnd(E, fin, fout) if transposed else rnd(E, fout, fin)
    return {"x": rnd(T, fin), "weight": w * fin ** -0.5, "bias": rnd(E, fout) if bias else None,
            "lora_A": rnd(r * E, fin) * fin ** -0.5, "lora_B": rnd(fout, r * E) * r ** -0.5,
            "idx": _uneven_routing(T, k, E)}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("transposed,bias", [(False, False), (True, True)])
def test_grouped_function_matches_the_per_pair_oracle(k, p, transposed, bias):
    T, E, fin, fout, r, s = 9, 5, 12, 10, 3, 1.7
    c = _case(T, k, E, fin, fout, r, bias, transposed)
    routing = ExpertRouting.from_top_k(c["idx"], E)
    assert routing.counts[0] == 0 and routing.counts[1] == 1
    leaves = {n: c[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B")}
    torch.manual_seed(123)
    y_sorted = fused_grouped_lora_linear(leaves["x"][routing.token], c["weight"], c["bias"], leaves["lora_A"],
                                         leaves["lora_B"], routing, s, p, training=True, transposed=transposed)
    dy = torch.randn(T * k, fout, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (y_sorted * dy[routing.order]).sum().backward()
    keep = None
    if p > 0:
        torch.manual_seed(123)
        seed = int(draw_seed(torch.device("cpu")).item())
        keep_sorted = torch_keep_mask(seed, (T * k, fin), p, torch.device("cpu"))
        keep = torch.empty_like(keep_sorted)
        keep[routing.order] = keep_sorted  # row i of the sorted mask is pair order[i]
        keep = keep.view(T, k, fin)
    ref_leaves = {n: c[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B")}
    ref = grouped_lora_reference(ref_leaves["x"], c["idx"], c["weight"], c["bias"], ref_leaves["lora_A"],
                                 ref_leaves["lora_B"], s, keep, p, transposed=transposed)
    (ref * dy.view(T, k, fout)).sum().backward()
    y = torch.empty_like(y_sorted)
    y[routing.order] = y_sorted
    torch.testing.assert_close(y.view(T, k, fout), ref, rtol=1e-12, atol=1e-12)
    for n in leaves:
        torch.testing.assert_close(leaves[n].grad, ref_leaves[n].grad, rtol=1e-12, atol=1e-12)
    # Expert 0 has no token: its A rows and B columns get exactly zero gradient.
    assert leaves["lora_A"].grad[:r].abs().max() == 0 and leaves["lora_B"].grad[:, 0::E].abs().max() == 0


def test_dropout_mask_is_per_pair_and_regenerated():
    """Two pairs of one token see different masks; the same seed gives the same output; p>0 differs from p=0."""
    T, E, fin, fout, r = 6, 4, 64, 8, 2
    c = _case(T, 2, E, fin, fout, r, False, False)
    c["idx"] = torch.tensor([[0, 1]] * T)
    routing = ExpertRouting.from_top_k(c["idx"], E)
    x = c["x"][routing.token]
    # Same A, B for both experts: any difference between a token's two rows comes from the masks.
    A = c["lora_A"][:r].repeat(E, 1)
    B = c["lora_B"][:, :1].repeat_interleave(r * E, dim=1) * 0 + c["lora_B"][:, :r].repeat_interleave(E, dim=1)
    W = c["weight"][:1].expand(E, -1, -1).contiguous()
    run = lambda p: fused_grouped_lora_linear(x, W, None, A, B, routing, 1.0, p)  # noqa: E731
    torch.manual_seed(5)
    y1 = run(0.5)
    torch.manual_seed(5)
    y2 = run(0.5)
    assert torch.equal(y1, y2)
    y0 = run(0.0)
    assert torch.allclose(y0[:T], y0[T:])  # no dropout: both experts' rows equal
    assert not torch.allclose(y1[:T], y1[T:])  # independent masks per pair
    assert not torch.allclose(y1, y0)


def test_routing_skips_experts_without_tokens():
    routing = ExpertRouting.from_top_k(torch.tensor([[3, 3], [3, 1], [3, 7]]), 6)
    # 7 is out of range (an expert-parallel sentinel): sorted last, counted by no expert.
    assert routing.counts == (0, 1, 0, 4, 0, 0)
    assert [e for e, _ in routing.slices()] == [1, 3]
    assert int(routing.order[-1]) == 5


# -- tiny models ------------------------------------------------------------------------------------------

def _model(kind, top_k=2):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, num_experts_per_tok=top_k)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=6,
                                          decoder_sparse_step=1, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=6,
                                          shared_expert_intermediate_size=16, decoder_sparse_step=1, **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=6, **common)
        cls = transformers.OlmoeForCausalLM
    else:
        cfg = transformers.GptOssConfig(intermediate_size=16, num_local_experts=4, layer_types=["full_attention"],
                                        **common)
        cls = transformers.GptOssForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():  # gpt-oss initialises its expert weights to zero; any base must matter here
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.2)
    return model


def _ours(base, **kw):
    model = copy.deepcopy(base)
    lk.inject_lora(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS,
                                        **kw))
    return model


def _peft(base, init=False):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS,
                          init_lora_weights=init)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _copy_peft_into_ours(pm, ours):
    from lora_kernels.persistence.keys import adapter_state_dict
    sd, osd = peft.get_peft_model_state_dict(pm), adapter_state_dict(ours)
    assert sorted(sd) == sorted(osd)
    with torch.no_grad():
        for key, t in sd.items():
            osd[key].copy_(t)


def _grads(model, word):
    return {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters()
            if word in n and p.grad is not None}


@pytest.mark.parametrize("kind,top_k", [("qwen3_moe", 1), ("qwen3_moe", 2), ("qwen2_moe", 2), ("mixtral", 2),
                                        ("olmoe", 2), ("gpt_oss", 2)])
def test_experts_match_peft_target_parameters(kind, top_k, monkeypatch):
    import lora_kernels.layers.experts as experts_mod
    calls = []
    real = experts_mod.fused_grouped_lora_linear
    monkeypatch.setattr(experts_mod, "fused_grouped_lora_linear",
                        lambda *a, **kw: calls.append(a[3] is not None) or real(*a, **kw))  # noqa: E501
    base = _model(kind, top_k)
    pm, ours = _peft(base), _ours(base)
    assert isinstance(ours.get_submodule("model.layers.0.mlp.experts"), FusedLoraExperts)
    _copy_peft_into_ours(pm, ours)
    router = next(n for n, _ in ours.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight")))
    dict(ours.named_parameters())[router].requires_grad_(True)
    dict(pm.named_parameters())["base_model.model." + router].requires_grad_(True)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = pm(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss)
    assert calls == [True, True]  # both projections on the grouped LoRA path
    a.loss.backward(), b.loss.backward()
    from lora_kernels.persistence.keys import own_names
    names = {k.replace("base_model.model.", ""): v for k, v in own_names(ours).items()}
    params = dict(ours.named_parameters())
    peft_grads = {n.replace(".default", ""): g for n, g in _grads(pm, "lora_").items()}
    assert len(peft_grads) == 6
    for key, g in peft_grads.items():  # every LoRA gradient, the experts' by PEFT's file key
        torch.testing.assert_close(params[names[key]].grad, g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[router].grad, _grads(pm, router)[router], rtol=1e-5, atol=1e-6)


def test_router_gradient_unchanged_at_init():
    """B = 0 at PEFT's init: the model and every gradient of the router equal the base's."""
    base = _model("qwen3_moe")
    ours = _ours(base)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    gate = "model.layers.0.mlp.gate.weight"
    dict(base.named_parameters())[gate].requires_grad_(True)
    dict(ours.named_parameters())[gate].requires_grad_(True)
    a, b = base(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-6, atol=1e-6)
    a.loss.backward(), b.loss.backward()
    torch.testing.assert_close(dict(ours.named_parameters())[gate].grad, dict(base.named_parameters())[gate].grad,
                               rtol=1e-6, atol=1e-7)


def test_base_checkpoint_names_unchanged():
    base = _model("qwen3_moe")
    ours = _ours(base)
    names = set(ours.state_dict())
    assert set(base.state_dict()) <= names
    assert "model.layers.0.mlp.experts.gate_up_proj_lora_A" in names


def test_peft_loads_ours_and_we_load_peft(tmp_path):
    base = _model("qwen3_moe")
    ours = _ours(base, init_lora_weights=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    want = ours(ids).logits
    lk.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)

    pm = _peft(base)
    pm.save_pretrained(tmp_path / "peft")
    back = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    assert isinstance(back.get_submodule("model.layers.0.mlp.experts"), FusedLoraExperts)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_merge_unmerge_disable(kind):
    base = _model(kind)
    ours = _ours(base, init_lora_weights=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    ours.eval()
    want = ours(ids).logits
    layer = ours.get_submodule("model.layers.0.mlp.experts")
    before = {p: getattr(layer, p).detach().clone() for p in layer.params}
    with lk.disable_adapter(ours):
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=0, atol=0)
    layer.merge()
    assert not torch.equal(layer.gate_up_proj, before["gate_up_proj"])
    torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    for p, w in before.items():
        assert torch.equal(getattr(layer, p), w)  # bit for bit
    merged = lk.merge_and_unload(ours)
    experts = merged.get_submodule("model.layers.0.mlp.experts")
    assert type(experts).__name__.endswith("Experts") and not isinstance(experts, FusedLoraExperts)
    torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(base.state_dict())


def test_dropout_trains_where_peft_refuses():
    base = _model("qwen3_moe")
    ours = _ours(base, lora_dropout=0.2, init_lora_weights=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    ours.train()
    torch.manual_seed(0)
    a = ours(ids, labels=ids)
    a.loss.backward()
    layer = ours.get_submodule("model.layers.0.mlp.experts")
    assert layer.gate_up_proj_lora_A.grad.abs().sum() > 0 and layer.down_proj_lora_B.grad.abs().sum() > 0
    ours.eval()
    assert not torch.allclose(ours(ids).logits, a.logits)


def test_refused_with_clear_errors():
    base = _model("qwen3_moe")
    with pytest.raises(ValueError, match="not a transformers experts module"):
        lk.inject_lora(copy.deepcopy(base), lk.LoraConfig(target_parameters=["self_attn.q_proj.weight"]))
    with pytest.raises(ValueError, match="DoRA on MoE experts"):
        lk.LoraConfig(use_dora=True, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="matched no parameter"):
        lk.inject_lora(copy.deepcopy(base), lk.LoraConfig(target_parameters=["mlp.experts.nope"]))
    ours = _ours(base)
    with pytest.raises(ValueError, match="holds one adapter"):
        lk.inject_lora(ours, lk.LoraConfig(target_parameters=EXPERTS), adapter_name="second")
    ids = torch.randint(0, 64, (2, 9))
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        with lk.batch_adapters(ours, ["default", None]):
            ours(ids)
    experts = base.get_submodule("model.layers.0.mlp.experts")
    experts.has_post_expert_norm = True
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.*has_post_expert_norm=True"):
        lk.inject_lora(base, lk.LoraConfig(target_parameters=EXPERTS))


def test_one_parameter_and_rank_pattern_round_trip_with_peft(tmp_path):
    """Only down_proj targeted (no nesting: `experts.lora_A.weight`), its rank from rank_pattern, both ways."""
    base = _model("qwen3_moe")
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"],
               rank_pattern={"down_proj": 3})
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    ours = copy.deepcopy(base)
    lk.inject_lora(ours, lk.LoraConfig(**cfg))
    layer = ours.get_submodule("model.layers.0.mlp.experts")
    assert layer.params == ("down_proj",) and layer.r == 3
    _copy_peft_into_ours(pm, ours)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    lk.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_fuse_peft_model_serves_param_wrappers(kind, monkeypatch):
    from lora_kernels.integrations.peft import fuse_peft_model, unfuse_peft_model
    import lora_kernels.layers.experts as experts_mod
    calls = []
    real = experts_mod.fused_grouped_lora_linear
    monkeypatch.setattr(experts_mod, "fused_grouped_lora_linear",
                        lambda *a, **kw: calls.append(a[3] is not None) or real(*a, **kw))  # noqa: E501
    base = _model(kind)
    pm = _peft(base)
    ref = copy.deepcopy(pm)
    report = fuse_peft_model(pm)
    assert "base_model.model.model.layers.0.mlp.experts" in report.fused and not report.skipped
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids, labels=ids), pm(ids, labels=ids)
    assert calls == [True, True]
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward(), b.loss.backward()
    ga, gb = _grads(ref, "lora_"), _grads(pm, "lora_")
    assert sorted(ga) == sorted(gb) and len(gb) == 6
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6)
    with pm.disable_adapter():  # PEFT's own forward runs for a disabled adapter
        torch.testing.assert_close(pm(ids).logits, base(ids).logits)
    assert calls == [True, True]
    assert "base_model.model.model.layers.0.mlp.experts" in unfuse_peft_model(pm)
    assert type(pm.get_submodule("base_model.model.model.layers.0.mlp.experts")) is peft.tuners.lora.ParamWrapper


def test_bf16_base_with_float32_adapters():
    base = _model("qwen3_moe").to(torch.bfloat16)
    ours = _ours(base, init_lora_weights=False)
    layer = ours.get_submodule("model.layers.0.mlp.experts")
    assert layer.gate_up_proj.dtype == torch.bfloat16 and layer.gate_up_proj_lora_A.dtype == torch.float32
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out = ours(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    g = layer.down_proj_lora_A.grad
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_unload_and_gradient_checkpointing():
    base = _model("qwen3_moe")
    ours = _ours(base, init_lora_weights=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = ours(ids, labels=ids)
    plain.loss.backward()
    layer = ours.get_submodule("model.layers.0.mlp.experts")
    want = layer.gate_up_proj_lora_A.grad.clone()
    layer.gate_up_proj_lora_A.grad = None
    set_checkpointing(ours)
    ours.train()
    ckpt = ours(ids, labels=ids)
    ckpt.loss.backward()
    torch.testing.assert_close(layer.gate_up_proj_lora_A.grad, want, rtol=1e-5, atol=1e-6)
    set_checkpointing(ours, enable=False)
    ours.eval()
    lk.unload(ours)
    assert not lora_layers(ours)
    torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_cli_tiny_moe_trains_and_merges(tmp_path, cli_defaults):
    """`finetune --model tiny-moe --target-parameters ...`: the loss falls, PEFT loads the adapter with our logits,
    and `merge` writes a plain model with the merged logits."""
    import json

    from lora_kernels.cli import main

    out = tmp_path / "run"
    rc = main(["finetune", "--model", "tiny-moe", "--output-dir", str(out), "--target-modules", "q_proj",
               "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj", "--lora-dropout", "0",
               "--max-steps", "30", "--seq-len", "32", "--batch-size", "4", "--eval-every", "30", "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                          for p in ("down_proj", "gate_up_proj")]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.25  # 5.99 -> 5.60 measured (seed 0)
    base = transformers.Qwen3MoeForCausalLM.from_pretrained(out / "base_model")
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    ours = lk.load_adapter(copy.deepcopy(base), out).eval()
    want = ours(ids).logits
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--model", str(out / "base_model"), "--adapter", str(out),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    merged = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_cli_experts_with_dropout_says_peft_cannot_load_it(tmp_path, cli_defaults, capsys):
    """PEFT refuses lora_dropout on target_parameters: the closing hint of such a run points to lk.load_adapter,
    which loads it, instead of printing a PeftModel snippet that would raise."""
    from lora_kernels.cli import main

    out = tmp_path / "run"
    assert main(["finetune", "--model", "tiny-moe", "--output-dir", str(out), "--target-parameters",
                 "mlp.experts.down_proj", "--lora-dropout", "0.1", "--max-steps", "1", "--seq-len", "16",
                 "--batch-size", "2", "--eval-every", "0", "--eval-fraction", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "PEFT cannot load it" in printed and "PeftModel.from_pretrained" not in printed
    lk.load_adapter(transformers.Qwen3MoeForCausalLM.from_pretrained(out / "base_model"), out)
    with pytest.raises(ValueError, match="lora_dropout"):
        peft.PeftModel.from_pretrained(transformers.Qwen3MoeForCausalLM.from_pretrained(out / "base_model"), out)
