"""MultiAdapterTrainer: a mixed batch trains each adapter exactly as its own rows alone would."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.data import DEMO_PATH, PackedDataset, load_packed, split_eval
from lora_kernels.data.loader import count_loss_tokens
from lora_kernels.models import build_tiny_model
from lora_kernels.training import TrainConfig, Trainer, causal_lm_loss_sum
from lora_kernels.training import MultiAdapterTrainer
from lora_kernels.training.multi import MixedBatches, mixed_loss

SEQ = 32


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model on one thread, as finetune runs it: threads only contend at this size."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _two_adapters(init=True, dropout=0.0):
    torch.manual_seed(0)
    model, tok = build_tiny_model(SEQ, seed=0)
    for name in ("a", "b"):
        lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            init_lora_weights=init), adapter_name=name)
    return model, tok


def _grads(model, name):
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None and (n.endswith(f"lora_As.{name}") or n.endswith(f"lora_Bs.{name}")
                                       or (name == "a" and n.endswith(("lora_A", "lora_B"))))}


def test_mixed_loss_gives_each_adapter_the_gradient_of_its_rows_alone():
    """Adapters with different loss-token counts (a 10, b 22): each one's part and gradient are those of its own
    mean loss. (The mean over all the batch's tokens would scale a's gradient by 10/32 and b's by 22/32.)"""
    model, _ = _two_adapters(init=False)  # random B too: A gets a gradient
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 12), generator=g)
    labels = ids.clone()
    labels[:2, :7] = -100
    names = ["a", "a", "b", "b"]
    denom = {"a": count_loss_tokens(labels[:2]), "b": count_loss_tokens(labels[2:])}
    with lk.batch_adapters(model, names):
        logits = model(ids).logits
    loss, parts = mixed_loss(logits, labels, names, denom)
    loss.backward()
    mixed = {name: _grads(model, name) for name in ("a", "b")}
    model.zero_grad(set_to_none=True)
    for name, rows in (("a", slice(0, 2)), ("b", slice(2, 4))):
        with lk.batch_adapters(model, [name, name]):
            alone = causal_lm_loss_sum(model(ids[rows]).logits, labels[rows]) / denom[name]
        alone.backward()
        torch.testing.assert_close(parts[name], alone.detach(), rtol=1e-6, atol=0)
        solo = _grads(model, name)
        assert solo and solo.keys() == mixed[name].keys()
        for n in solo:
            torch.testing.assert_close(mixed[name][n], solo[n], rtol=1e-5, atol=1e-7)
        model.zero_grad(set_to_none=True)


def test_two_adapters_train_as_each_would_alone(tmp_path):
    """Same seed, same rows (each adapter's own data order), per-adapter clipping: after 3 steps adapter a of a
    two-adapter run equals a run of a alone from the same init, and so does its eval loss."""
    model, tok = _two_adapters(init=True)
    ds = load_packed(DEMO_PATH, tok, SEQ)
    train_a, ev_a = split_eval(ds, 0.05, seed=0)
    train_b, _ = split_eval(ds, 0.5, seed=1)  # other rows
    cfg = dict(max_steps=3, batch_size=3, lr=2e-3, warmup_steps=1, eval_every=0, eval_batches=2, progress=False,
               plot=False, max_grad_norm=0.5)
    init_a = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    multi = MultiAdapterTrainer(model, {"a": train_a, "b": train_b},
                                TrainConfig(output_dir=str(tmp_path / "m"), **cfg), eval_data={"a": ev_a})
    multi.train()

    torch.manual_seed(0)
    alone, _ = build_tiny_model(SEQ, seed=0)
    lk.inject_lora(alone, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    alone.load_state_dict(init_a, strict=False)
    solo = Trainer(alone, train_a, TrainConfig(output_dir=str(tmp_path / "s"), **cfg), eval_data=ev_a)
    solo.train()
    trained = dict(alone.named_parameters())
    for n in init_a:
        mine = model.get_parameter(n)
        assert n.endswith("lora_A") or not torch.equal(mine, init_a[n])  # B moved off zero
        torch.testing.assert_close(mine, trained[n], rtol=1e-4, atol=1e-6)
    hist_m, hist_s = multi.metrics.read(), solo.metrics.read()
    assert [r["grad_norm/a"] for r in hist_m] == pytest.approx([r["grad_norm"] for r in hist_s], rel=1e-4)
    assert hist_m[-1]["eval_loss/a"] == pytest.approx(hist_s[-1]["eval_loss"], rel=1e-5)
    assert "eval_loss/b" not in hist_m[-1] and hist_m[-1]["eval_loss"] == hist_m[-1]["eval_loss/a"]


def test_mixed_batches_hold_batch_size_rows_of_each_adapter_and_resume_their_cursors():
    big = PackedDataset(torch.arange(20).view(10, 2), torch.arange(20).view(10, 2))
    small = PackedDataset(torch.arange(6).view(3, 2) + 100, torch.arange(6).view(3, 2))
    src = MixedBatches({"big": big, "small": small}, batch_size=2, seed=0)
    ids, _, names = src.next()
    assert names == ["big", "big", "small", "small"] and ids.shape == (4, 2)
    _, _, names = src.next()  # small's epoch ends with one row
    assert names == ["big", "big", "small"] and src.epochs() == {"big": 0, "small": 0}
    state = src.state()
    later = [src.next()[0] for _ in range(3)]
    again = MixedBatches({"big": big, "small": small}, batch_size=2, seed=0)
    again.load_state(state)
    assert all(torch.equal(x, again.next()[0]) for x in later)
    with pytest.raises(ValueError, match="data cursors are for adapters"):
        again.load_state({"big": state["big"]})


def test_refuses_models_whose_adapters_or_trainable_parameters_do_not_match(tmp_path):
    model, tok = _two_adapters()
    ds = load_packed(DEMO_PATH, tok, SEQ)
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, plot=False)
    with pytest.raises(ValueError, match="are not the adapters with training data"):
        MultiAdapterTrainer(model, {"a": ds}, cfg)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="belong to no adapter"):
        MultiAdapterTrainer(model, {"a": ds, "b": ds}, cfg)
