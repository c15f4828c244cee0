"""The seeds' encoder workflow, as docs/peft_transformers.md (Workflows) shows it: BERT sequence classification
with LoRA on layer 11's query/value and a trained classifier, layer 1's query/value added mid-training without losing
the optimizer state, saved with save_adapter and loaded back by PEFT."""
import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import lora_kernels as lk
from tiny_models import assert_rel_close

VOCAB = 50


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # Two dozen training steps through four LoRA layers: the torch backend keeps this quick on CPU.
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] % 2)}


def train(model, opt, data, steps):
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**data).loss
        loss.backward()
        opt.step()
    return loss.item()


def test_bert_layer11_then_layer1_with_classifier_saved_and_loaded_by_peft(tmp_path):
    model = bert()
    data = batch()
    # Stage 1, the seed's config: layer 11's query/value, classifier trained in full (a copy; the original stays).
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, modules_to_save=["classifier"],
                                        target_modules=["11.attention.self.query", "11.attention.self.value"]))
    layers = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert layers() == {f"bert.encoder.layer.11.attention.self.{m}.lora_{ab}" for m in ("query", "value")
                        for ab in "AB"} | {"classifier.trained_module.weight", "classifier.trained_module.bias"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    with torch.no_grad():
        start_loss = model(**data).loss.item()
    train(model, opt, data, steps=6)
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    # Stage 2, mid-training: layer 1's query/value join; the existing adapters and their Adam moments stay.
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                        target_modules=["1.attention.self.query", "1.attention.self.value"]))
    added = lk.add_new_trainable_to_optimizer(opt, model)
    assert sorted(added) == sorted(f"bert.encoder.layer.1.attention.self.{m}.lora_{ab}"
                                   for m in ("query", "value") for ab in "AB")
    for p, s in opt.state.items():  # nothing reset by the addition
        for k, v in s.items():
            torch.testing.assert_close(v, state_before[id(p)][k], rtol=0, atol=0)
    new_params = [p for g in opt.param_groups[1:] for p in g["params"]]
    layer1_before = [p.detach().clone() for p in new_params]
    old_param = model.bert.encoder.layer[11].attention.self.query.lora_A
    final_loss = train(model, opt, data, steps=6)
    assert opt.state[old_param]["step"].item() == 12  # Adam's count continued across the addition
    assert all(not torch.equal(p, q) for p, q in zip(new_params, layer1_before))
    assert final_loss < 0.8 * start_loss, (start_loss, final_loss)
    # the base and the original classifier never moved
    fresh = bert()
    for name, p in fresh.named_parameters():
        mine = name.replace("classifier.", "classifier.original_module.")
        torch.testing.assert_close(model.get_parameter(mine), p, rtol=0, atol=0, msg=name)

    # Save in PEFT's format; PEFT loads it onto a fresh BERT and computes the same logits.
    lk.save_adapter(model, tmp_path / "adapter", task_type="SEQ_CLS")
    model.eval()
    loaded = peft.PeftModel.from_pretrained(bert(), tmp_path / "adapter").eval()
    assert sorted(loaded.peft_config["default"].target_modules) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (1, 11) for m in ("query", "value"))
    with torch.no_grad():
        ours = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        theirs = loaded(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        base = bert().eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert_rel_close(theirs, ours, rel=1e-5, what="PeftModel.from_pretrained logits")
    assert not torch.allclose(ours, base, atol=1e-3)
