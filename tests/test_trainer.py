"""Trainer: schedule, accumulation, skipped non-finite steps, AMP, metrics, and exact resume on CPU."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.data import DEMO_PATH, load_packed, split_eval
from lora_kernels.models import build_tiny_model
from lora_kernels.training import TrainConfig, Trainer, trainable_state_dict, warmup_cosine

SEQ = 32


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def _model_and_data(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    model, tok = build_tiny_model(SEQ, seed=seed)
    lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    train, ev = split_eval(load_packed(DEMO_PATH, tok, SEQ), 0.02)
    return model, train, ev


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, batch_size=4, lr=2e-3, warmup_steps=2, eval_every=3,
                progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_warmup_cosine_shape():
    vals = [warmup_cosine(s, 4, 20, 0.1) for s in range(20)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(vals[3:], vals[4:]))
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(12, 4, 20, 0.0) == pytest.approx(0.5)


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(output_dir=str(tmp_path), max_steps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(output_dir=str(tmp_path), precision="fp8")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(output_dir=str(tmp_path), lr=float("nan"))


def test_no_trainable_parameters_is_an_error(tmp_path):
    model, tok = build_tiny_model(SEQ)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(model, load_packed(DEMO_PATH, tok, SEQ), _cfg(tmp_path))


def test_only_trainable_params_change_and_metrics_written(tmp_path):
    model, train, ev = _model_and_data()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_state_dict(model)
    res = Trainer(model, train, _cfg(tmp_path, plot=True), eval_data=ev).train()
    after = trainable_state_dict(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    recs = _metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert recs[0]["lr"] == pytest.approx(1e-3) and recs[1]["lr"] == pytest.approx(2e-3)
    assert "eval_loss" in recs[2] and recs[2]["eval_ppl"] == pytest.approx(math.exp(recs[2]["eval_loss"]))
    assert res.plot_path and os.path.getsize(res.plot_path) > 1000
    with open(res.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_grad_accumulation_equals_big_batch(tmp_path):
    results = []
    for bs, accum in ((4, 1), (2, 2), (1, 4)):
        model, train, _ = _model_and_data(dropout=0.0)
        Trainer(model, train, _cfg(tmp_path / f"{bs}", max_steps=2, batch_size=bs, grad_accum=accum)).train()
        results.append(trainable_state_dict(model))
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    model, train, _ = _model_and_data(dropout=0.0)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output  # second forward = step 2

    model.model.layers[0].mlp.register_forward_hook(poison)
    trainer = Trainer(model, train, _cfg(tmp_path, max_steps=3, eval_every=0))
    state = {}
    orig_step = trainer._train_step

    def spy():
        state[trainer.step] = trainable_state_dict(model)
        return orig_step()

    trainer._train_step = spy
    res = trainer.train()
    recs = _metrics(tmp_path)
    assert res.skipped_steps == 1
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert not math.isfinite(recs[1]["grad_norm"])
    after_step2 = state[2]
    for n, t in state[1].items():  # the skipped step left every adapter tensor as it was
        assert torch.equal(t, after_step2[n])
    assert all(torch.isfinite(t).all() for t in trainable_state_dict(model).values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    model, train, ev = _model_and_data()
    res = Trainer(model, train, _cfg(tmp_path, max_steps=3, precision=precision), eval_data=ev).train()
    recs = _metrics(tmp_path)
    assert res.step == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert all(t.dtype == torch.float32 for t in trainable_state_dict(model).values())


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    """With dropout > 0: a run resumed from its step-3 checkpoint ends bit-identical to the full run."""
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    model, train, ev = _model_and_data(dropout=0.2)
    Trainer(model, train, _cfg(full_dir, save_every=3, batch_size=3), eval_data=ev).train()
    full = trainable_state_dict(model)
    ckpt = full_dir / "checkpoints" / "step-0000003"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "rank0.json").is_file()

    # A fresh process state: new model, scrambled RNG, the output dir holding only what was on disk at step 3.
    os.makedirs(resumed_dir / "checkpoints")
    shutil.copytree(ckpt, resumed_dir / "checkpoints" / "step-0000003")
    with open(full_dir / "metrics.jsonl") as f, open(resumed_dir / "metrics.jsonl", "w") as g:
        g.writelines(line for line in f if json.loads(line)["step"] <= 3)
    model2, train2, ev2 = _model_and_data(dropout=0.2, seed=0)
    torch.manual_seed(12345)
    res = Trainer(model2, train2, _cfg(resumed_dir, save_every=3, batch_size=3), eval_data=ev2).train(
        resume_from="latest")
    assert res.step == 6
    resumed = trainable_state_dict(model2)
    for n in full:
        assert torch.equal(full[n], resumed[n]), n
    a, b = _metrics(full_dir), _metrics(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "eval_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)


def test_resume_from_missing_checkpoint_is_an_error(tmp_path):
    model, train, _ = _model_and_data()
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(model, train, _cfg(tmp_path)).train(resume_from="latest")
    with pytest.raises(ValueError, match="not a checkpoint"):
        Trainer(model, train, _cfg(tmp_path)).train(resume_from=str(tmp_path))


def test_plain_module_returning_logits(tmp_path):
    """Not only HF models: any module mapping input_ids to logits trains."""
    torch.manual_seed(0)
    emb = nn.Embedding(259, 16)
    head = lk.FusedLoraLinear(16, 259, r=2, lora_dropout=0.1)
    model = nn.Sequential(emb, head)
    emb.requires_grad_(False)
    _, tok = build_tiny_model(SEQ)
    ds = load_packed(DEMO_PATH, tok, SEQ)
    res = Trainer(model, ds, _cfg(tmp_path, max_steps=20, lr=1e-2, eval_every=0)).train()
    recs = _metrics(tmp_path)
    assert res.step == 20 and sum(r["loss"] for r in recs[-5:]) < sum(r["loss"] for r in recs[:5])


def test_fresh_run_with_overwrite_clears_previous_runs_checkpoints(tmp_path):
    """(Without overwrite=True a used directory is refused: tests/test_runs.py. A folder that is not a run of ours,
    one without a manifest, is refused even with overwrite: tests/test_safe_overwrite.py.)"""
    model, train, _ = _model_and_data()
    Trainer(model, train, _cfg(tmp_path, max_steps=1, eval_every=0)).train()  # a previous run, with its manifest
    stale = tmp_path / "checkpoints" / "step-0000999"
    stale.mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    model, train, _ = _model_and_data()
    Trainer(model, train, _cfg(tmp_path, max_steps=2, eval_every=0, overwrite=True)).train()
    assert not stale.exists() and (tmp_path / "checkpoints" / "step-0000002").is_dir()
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
