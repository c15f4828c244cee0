"""Several named adapters on one model: inject_lora(adapter_name=), set_adapter, batch_adapters (mixed batches,
one adapter per row), per-adapter save / load in PEFT's format, and PEFT's own mixed batch as the oracle.

The reference for a mixed batch is the model run one row at a time with that row's adapter alone (set_adapter)
or with no adapter (disable_adapter). Most cases run on the torch backend (fast); the one marked `interpreter`
runs the Triton kernels under TRITON_INTERPRET=1.
"""
import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.inject import lora_layers, model_adapters
from tiny_models import assert_rel_close, tiny_llama, tokens

NAMES = ["a", "b", None, "a"]


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def two_adapter_llama(seed=0, with_c=False):
    """a: r=4 on q/v; b: r=6, another alpha, on q/k/o (shares q_proj with a at a different rank)."""
    model = tiny_llama(seed)
    torch.manual_seed(seed + 10)
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False), adapter_name="a")
    lk.inject_lora(model, lk.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "k_proj", "o_proj"],
                                        init_lora_weights=False), adapter_name="b")
    if with_c:
        lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False),
                       adapter_name="c")
    return model


def per_row_logits(model, ids, names):
    """Each row alone, with its adapter as the active one (None: adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with lk.disable_adapter(model):
                rows.append(model(ids[i:i + 1]).logits)
        else:
            lk.set_adapter(model, name)
            rows.append(model(ids[i:i + 1]).logits)
    return torch.cat(rows)


# -- naming and storage ----------------------------------------------------------------------------------

def test_single_adapter_keeps_todays_names():
    for kwargs in ({}, {"adapter_name": "a"}):
        model = tiny_llama()
        lk.inject_lora(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), **kwargs)
        lora = [k for k in model.state_dict() if "lora" in k]
        assert lora == ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B",
                        "model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B"]


def test_second_adapter_lives_beside_the_first_with_its_own_rank():
    model = two_adapter_llama()
    assert model_adapters(model) == ["a", "b"]
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[0].self_attn.k_proj
    assert q.adapter_names == ["a", "b"] and k.adapter_names == ["b"]
    assert q.lora_A.shape == (4, 48) and q.lora_As["b"].shape == (6, 48) and q.lora_Bs["b"].shape == (48, 6)
    assert k.lora_A.shape == (6, 48)  # b is k_proj's first (only) adapter: it takes lora_A
    names = {n for n, _ in model.named_parameters() if "lora" in n}
    assert "model.layers.0.self_attn.q_proj.lora_As.b" in names
    assert "model.layers.0.self_attn.k_proj.lora_A" in names
    # The new adapter trains; the active adapter is still the first one added (PEFT's add_adapter).
    assert q.lora_As["b"].requires_grad and q.active_adapter == "a"


# -- set_adapter ------------------------------------------------------------------------------------------

def test_set_adapter_switches_what_computes_and_what_trains(torch_backend):
    model = two_adapter_llama().eval()
    ids = tokens(2, 5)
    with lk.disable_adapter(model):
        base = model(ids).logits
    out_a = model(ids).logits
    lk.set_adapter(model, "b")
    out_b = model(ids).logits
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    q = model.model.layers[0].self_attn.q_proj
    v = model.model.layers[0].self_attn.v_proj
    assert q.lora_As["b"].requires_grad and not q.lora_A.requires_grad and not v.lora_A.requires_grad
    # Only b computes: the model equals the base model plus b's layers alone.
    ref = two_adapter_llama().eval()
    lk.set_adapter(ref, "b")
    for layer in lora_layers(ref).values():
        if "b" not in layer.adapter_names:
            layer.adapter_enabled = False
    assert_rel_close(out_b, ref(ids).logits, 1e-6, "set_adapter b")
    lk.set_adapter(model, "a")
    assert_rel_close(model(ids).logits, out_a, 1e-6, "back to a")


def test_unknown_adapter_names_it_and_lists_the_adapters():
    model = two_adapter_llama()
    with pytest.raises(ValueError, match=r"'zz'.*\['a', 'b'\]"):
        lk.set_adapter(model, "zz")
    with pytest.raises(ValueError, match=r"'zz'.*\['a', 'b'\]"):
        with lk.batch_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match=r"'zz'.*\['a', 'b'\]"):
        lk.save_adapter(model, "/nonexistent/never", adapter_name="zz")
    with pytest.raises(ValueError, match="adapter_name"):
        lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="x.y")


# -- mixed batches ----------------------------------------------------------------------------------------

def test_mixed_batch_equals_each_row_with_its_adapter_alone(torch_backend):
    model = two_adapter_llama().eval()
    ids = tokens(4, 6)
    with torch.no_grad():
        with lk.batch_adapters(model, NAMES):
            mixed = model(ids).logits
        ref = per_row_logits(model, ids, NAMES)
    assert_rel_close(mixed, ref, 1e-5, "mixed batch")
    # The block leaves the model in whole-batch mode.
    assert all(layer._batch is None for layer in lora_layers(model).values())


def test_mixed_batch_gradients_reach_only_the_adapters_with_rows(torch_backend):
    model = two_adapter_llama(with_c=True).train()
    ids = tokens(4, 6)
    w = torch.randn(4, 6, 128, generator=torch.Generator().manual_seed(3))
    with lk.batch_adapters(model, NAMES):
        (model(ids).logits * w).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # c has no row in the batch: no gradient at all (None, not zeros), nor has the frozen base.
    assert mixed and all("lora" in n for n in mixed)
    assert not any(n.endswith("lora_As.c") or n.endswith("lora_Bs.c") for n in mixed)
    ref = two_adapter_llama(with_c=True).train()
    for name, rows in (("a", [0, 3]), ("b", [1])):
        ref.zero_grad()
        lk.set_adapter(ref, name)
        (ref(ids[rows]).logits * w[rows]).sum().backward()
        expect = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert expect
        for n, g in expect.items():
            assert_rel_close(mixed[n], g, 1e-4, f"grad {n} of {name}")



def test_a_training_batch_with_rows_of_a_frozen_adapter_warns_once(torch_backend):
    """set_adapter("a") freezes "b" (as PEFT's): a mixed training batch then gives "b" no gradient. Warned once,
    naming "b" and how to make it train; after that it trains."""
    import warnings

    model = two_adapter_llama().train()
    lk.set_adapter(model, "a")
    ids = tokens(4, 6)
    with pytest.warns(UserWarning, match=r"adapter\(s\) \['b'\] .* no gradient.*set_adapter_trainable"):
        with lk.batch_adapters(model, NAMES):
            model(ids).logits.sum().backward()
    assert all(p.grad is None for layer in lora_layers(model).values() if "b" in layer.adapter_names
               for p in layer.adapter_params("b"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lk.batch_adapters(model, NAMES):  # once per model and adapter
            model(ids).logits.sum()
        model.eval()
        with torch.no_grad(), lk.batch_adapters(model, NAMES):  # serving: nothing trains, nothing to say
            model(ids)
    model.train()
    for layer in lora_layers(model).values():
        if "b" in layer.adapter_names:
            layer.set_adapter_trainable("b", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lk.batch_adapters(model, NAMES):
            model(ids).logits.sum().backward()
    assert all(p.grad is not None for layer in lora_layers(model).values() if "b" in layer.adapter_names
               for p in layer.adapter_params("b"))


def test_shared_target_with_different_ranks_and_dropout_per_adapter(torch_backend):
    """r=1 and r=7 on one target, dropout 0.3 for a and none for b: in a training mixed batch only a's rows
    see dropout (they differ from eval and repeat under the same seed); b's and base rows equal eval."""
    model = tiny_llama()
    lk.inject_lora(model, lk.LoraConfig(r=1, lora_dropout=0.3, target_modules=["q_proj"], init_lora_weights=False),
                   adapter_name="a")
    lk.inject_lora(model, lk.LoraConfig(r=7, lora_dropout=0.0, target_modules=["q_proj"], init_lora_weights=False),
                   adapter_name="b")
    ids = tokens(3, 5)
    with lk.batch_adapters(model.train(), ["a", "b", None]):
        torch.manual_seed(5)
        train = model(ids).logits
        torch.manual_seed(5)
        again = model(ids).logits
        loss = model(ids, labels=ids).loss
    loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert torch.isfinite(loss) and q.lora_A.grad.abs().sum() > 0 and q.lora_As["b"].grad.abs().sum() > 0
    with torch.no_grad(), lk.batch_adapters(model.eval(), ["a", "b", None]):
        ev = model(ids).logits
    assert torch.equal(train, again)
    assert not torch.allclose(train[0], ev[0], atol=1e-4)  # a's row: dropped
    assert_rel_close(train[1:].detach(), ev[1:], 1e-6, "b and base rows: no dropout")


def test_batch_size_mismatch_names_both_numbers(torch_backend):
    model = two_adapter_llama()
    with pytest.raises(ValueError, match=r"batch_adapters.*3 .*4|batch_adapters.*4 .*3"):
        with lk.batch_adapters(model, ["a", "b", None]):
            model(tokens(4, 5))


def test_disable_adapter_inside_a_mixed_batch_gives_the_base(torch_backend):
    model = two_adapter_llama().eval()
    ids = tokens(4, 5)
    with torch.no_grad():
        with lk.disable_adapter(model):
            base = model(ids).logits
        with lk.batch_adapters(model, NAMES), lk.disable_adapter(model):
            out = model(ids).logits
    assert_rel_close(out, base, 1e-6, "disabled")


def test_generate_with_one_adapter_per_prompt(torch_backend):
    model = two_adapter_llama().eval()
    ids = tokens(3, 4)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with lk.batch_adapters(model, ["b", None, "a"]):
        mixed = model.generate(ids, **kwargs)
    rows = []
    for i, name in enumerate(["b", None, "a"]):
        if name is None:
            with lk.disable_adapter(model):
                rows.append(model.generate(ids[i:i + 1], **kwargs))
        else:
            lk.set_adapter(model, name)
            rows.append(model.generate(ids[i:i + 1], **kwargs))
    assert torch.equal(mixed, torch.cat(rows))


def test_merge_and_unload_merges_the_active_adapter(torch_backend):
    model = two_adapter_llama().eval()
    ids = tokens(2, 5)
    lk.set_adapter(model, "b")
    with torch.no_grad():
        want = model(ids).logits
        with lk.batch_adapters(model, ["a", "b"]):
            with pytest.raises(RuntimeError, match="ambiguous"):
                lk.merge_and_unload(model)
        lk.merge_and_unload(model)
        assert not lora_layers(model)
        assert_rel_close(model(ids).logits, want, 1e-5, "merged b")


def test_mixed_batch_on_the_triton_kernels(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 13), nn.Tanh(), nn.Linear(13, 7))
    lk.inject_lora(model, lk.LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights=False), adapter_name="a")
    lk.inject_lora(model, lk.LoraConfig(r=5, lora_alpha=4, target_modules=["0"], init_lora_weights=False),
                   adapter_name="b")
    x = torch.randn(3, 2, 10)
    with lk.batch_adapters(model, ["b", None, "a"]):
        y = model(x)
    (y * y).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    lk.set_adapter(model, "b")
    y_b = model(x[0:1])
    (y_b * y_b).sum().backward()  # before set_adapter("a") freezes b
    with lk.disable_adapter(model):
        y_base = model(x[1:2])
    lk.set_adapter(model, "a")
    y_a = model(x[2:3])
    (y_a * y_a).sum().backward()
    assert_rel_close(y, torch.cat([y_b, y_base, y_a]).detach(), 1e-4, "triton mixed")
    for n, g in grads.items():
        assert_rel_close(g, dict(model.named_parameters())[n].grad, 1e-4, n)


# -- save / load, and PEFT ------------------------------------------------------------------------------------

def test_save_and_load_per_adapter(tmp_path, torch_backend):
    model = two_adapter_llama().eval()
    lk.save_adapter(model, tmp_path / "a", adapter_name="a")
    lk.save_adapter(model, tmp_path / "b", adapter_name="b")
    with pytest.raises(ValueError, match=r"several adapters \['a', 'b'\].*adapter_name"):
        lk.save_adapter(model, tmp_path / "x")
    from safetensors.torch import load_file

    keys_b = sorted(load_file(tmp_path / "b" / "adapter_model.safetensors"))
    assert keys_b[0] == "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    assert len(keys_b) == 12 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys_b)
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(load_file(tmp_path / "b" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], q.lora_Bs["b"].detach())

    fresh = tiny_llama().eval()
    lk.load_adapter(fresh, tmp_path / "a", adapter_name="a")
    lk.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    ids = tokens(4, 5)
    with torch.no_grad(), lk.batch_adapters(model, NAMES):
        want = model(ids).logits
    with torch.no_grad(), lk.batch_adapters(fresh, NAMES):
        got = fresh(ids).logits
    assert_rel_close(got, want, 1e-6, "reloaded")
    assert [n for n, _ in fresh.named_parameters() if "lora" in n] == \
        [n for n, _ in model.named_parameters() if "lora" in n]
    with pytest.raises(ValueError, match=r"several adapters \['a', 'b'\].*adapter_name"):
        lk.load_adapter(fresh, tmp_path / "a")
    # An existing name takes the file's weights again (here a's file into a: unchanged outputs).
    with torch.no_grad():
        fresh.model.layers[0].self_attn.q_proj.lora_A.zero_()
    lk.load_adapter(fresh, tmp_path / "a", adapter_name="a")
    assert model_adapters(fresh) == ["a", "b"]
    with torch.no_grad(), lk.batch_adapters(fresh, NAMES):
        assert_rel_close(fresh(ids).logits, want, 1e-6, "a reloaded")


def test_peft_loads_our_adapters_and_its_mixed_batch_matches_ours(tmp_path, torch_backend):
    from peft import PeftModel

    model = two_adapter_llama().eval()
    lk.save_adapter(model, tmp_path / "a", adapter_name="a")
    lk.save_adapter(model, tmp_path / "b", adapter_name="b")
    pm = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.eval()
    ids = tokens(4, 5)
    with torch.no_grad():
        theirs = pm(input_ids=ids, adapter_names=["a", "b", "__base__", "a"]).logits
        with lk.batch_adapters(model, ["a", "b", "__base__", "a"]):
            ours = model(ids).logits
    assert_rel_close(ours, theirs, 1e-5, "PEFT adapter_names")
    # And the other way: PEFT's saves of both adapters load into ours as named adapters.
    pm.save_pretrained(str(tmp_path / "peft"))  # one folder per named adapter: peft/a, peft/b
    fresh = tiny_llama().eval()
    lk.load_adapter(fresh, tmp_path / "peft" / "a", adapter_name="a")
    lk.load_adapter(fresh, tmp_path / "peft" / "b", adapter_name="b")
    with torch.no_grad(), lk.batch_adapters(fresh, NAMES):
        assert_rel_close(fresh(ids).logits, ours, 1e-5, "PEFT-saved")


def test_fuse_peft_model_serves_peft_mixed_batches_on_the_kernels(torch_backend, monkeypatch):
    import lora_kernels.integrations.peft as lk_peft
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    # c has a lora_B bias, which the segmented kernels do not add: its calls stay on PEFT's path.
    pm.add_adapter("c", LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False))
    pm.eval()
    ids = tokens(4, 5)
    mixes = (["a", "b", "__base__", "a"], ["b", "__base__", "b", "b"], ["c", "a", "b", "__base__"])
    with torch.no_grad():
        want = [pm(input_ids=ids, adapter_names=names).logits for names in mixes]
        assert not lk_peft.fuse_peft_model(pm).skipped
        calls = []
        real = lk_peft.fused_multi_lora_linear
        monkeypatch.setattr(lk_peft, "fused_multi_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
        for names, w in zip(mixes, want):
            calls.clear()
            assert_rel_close(pm(input_ids=ids, adapter_names=names).logits, w, 1e-5, f"fused {names}")
            # q, k, v of 2 layers on the kernels; with c in the batch its q_proj layers fall back.
            assert len(calls) == (4 if "c" in names else 6), names


def test_gpt2_conv1d_layers_take_several_adapters(torch_backend, tmp_path):
    """Conv1D bases (weight stored (in, out)): mixed batches and per-adapter saves that PEFT reads."""
    import transformers
    from peft import PeftModel

    def gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
        return transformers.GPT2LMHeadModel(cfg).eval()

    model = gpt2()
    lk.inject_lora(model, lk.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False), adapter_name="a")
    lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
                   adapter_name="b")
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with lk.batch_adapters(model, ["b", "a", None]):
            mixed = model(ids).logits
        assert_rel_close(mixed, per_row_logits(model, ids, ["b", "a", None]), 1e-5, "gpt2 mixed")
    lk.save_adapter(model, tmp_path / "a", adapter_name="a")
    lk.save_adapter(model, tmp_path / "b", adapter_name="b")
    pm = PeftModel.from_pretrained(gpt2(), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    with torch.no_grad():
        assert_rel_close(pm(input_ids=ids, adapter_names=["b", "a", "__base__"]).logits, mixed, 1e-5, "PEFT gpt2")
