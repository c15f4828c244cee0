"""transformers.Trainer with a fused-LoRA model and no callback: adapter-only checkpoints in PEFT's format, and
resume_from_checkpoint that continues exactly where the uninterrupted run was."""
import copy
import json
import os
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import load_sharded_checkpoint
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX_NAME

import lora_kernels as lk
from lora_kernels.integrations.transformers import apply_fused_lora, disable_adapter_checkpoints
from tiny_models import assert_rel_close

VOCAB = 64
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # Trainer runs dozens of forward/backward passes; the interpreter's kernels are covered elsewhere.
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def base_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg)


def fused_model(how="apply_fused_lora", lora_seed=0, **cfg):
    """The tiny base (always the same weights) with adapters whose init depends on lora_seed."""
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1,
           "init_lora_weights": False, **cfg}
    model = base_model()
    torch.manual_seed(lora_seed)
    if how == "apply_fused_lora":
        return apply_fused_lora(model, **cfg)
    return lk.inject_lora(model, lk.LoraConfig(**cfg))


def dataset(n=8, seq=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, VOCAB, (n, seq), generator=g)]


def args(output_dir, **kw):
    kw = {"max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
          "save_steps": 3, "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0, **kw}
    return TrainingArguments(output_dir=str(output_dir), **kw)


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


def trained_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_resumed_like_full(trainer, full_trainer, resumed_model, want, steps):
    """A run resumed from a checkpoint ends where the uninterrupted one did: the same (step, loss) log (dropout
    on, so the RNG was restored too), the trained parameters `want` and the Adam state, bit for bit. Returns the
    resumed model's trained parameters."""
    def losses(t):
        return [(e["step"], e["loss"]) for e in t.state.log_history if "loss" in e]

    assert losses(trainer) == losses(full_trainer) and len(losses(trainer)) == steps
    got = trained_params(resumed_model)
    assert got.keys() == want.keys()
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0, msg=n)
    opt, opt_full = trainer.optimizer.state_dict(), full_trainer.optimizer.state_dict()
    assert opt["state"].keys() == opt_full["state"].keys()
    for i, s in opt["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(v, opt_full["state"][i][k], rtol=0, atol=0, msg=f"optimizer {i} {k}")
    return got


@pytest.mark.parametrize("how", ["apply_fused_lora", "inject_lora"])
def test_checkpoints_hold_only_the_adapter_and_peft_loads_them(tmp_path, how):
    model = fused_model(how)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2, save_steps=2), train_dataset=dataset())
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert ADAPTER_FILES <= files and not files & FULL_MODEL_FILES, files
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    with open(ckpt / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"
    assert set(load_file(ckpt / "adapter_model.safetensors")) == {
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
        for i in (0, 1) for p in "qv" for ab in "AB"}

    x = dataset(n=2)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
        assert not torch.allclose(trained, base_model()(x).logits)  # the adapter is not a no-op
        from_peft = peft.PeftModel.from_pretrained(base_model(), ckpt).eval()(x).logits
        assert_rel_close(from_peft, trained, rel=1e-5, what="PeftModel.from_pretrained")

    # trainer.save_model() (the usual last line) writes the adapter to output_dir too.
    trainer.save_model()
    assert ADAPTER_FILES <= set(os.listdir(tmp_path)) and "model.safetensors" not in os.listdir(tmp_path)

    # Merged, it is a plain transformers model again: save_pretrained writes the full model.
    merged = lk.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    assert "model.safetensors" in os.listdir(tmp_path / "merged")
    with torch.no_grad():
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(x).logits
    assert_rel_close(reloaded, trained, rel=1e-5, what="merged")


def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path):
    # lm_head in modules_to_save: its trained copy must come back from the checkpoint too.
    cfg = {"modules_to_save": ["lm_head"]}
    full = fused_model(**cfg)
    full_trainer = Trainer(model=full, args=args(tmp_path / "full"), train_dataset=dataset())
    full_trainer.train()

    # The interrupted run: all that survives is checkpoint-3. The model is rebuilt from the same base with a
    # differently initialised adapter, so whatever matches the uninterrupted run came from the checkpoint.
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert ADAPTER_FILES <= set(os.listdir(ckpt)) and not set(os.listdir(ckpt)) & FULL_MODEL_FILES
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-3")
    resumed = fused_model(lora_seed=1, **cfg)
    assert any(not torch.equal(p, trained_params(full)[n]) for n, p in trained_params(resumed).items())
    trainer = Trainer(model=resumed, args=args(tmp_path / "resumed"), train_dataset=dataset())
    steps = StepRecorder()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=True)

    assert steps.seen == [4, 5, 6] and trainer.state.global_step == 6

    got = assert_resumed_like_full(trainer, full_trainer, resumed, trained_params(full), steps=6)
    assert any("lm_head" in n for n in got)
    assert trainer.lr_scheduler.state_dict() == full_trainer.lr_scheduler.state_dict()


def test_adapter_keys_load_through_load_state_dict_and_foreign_keys_are_errors(tmp_path):
    trained = fused_model(lora_seed=3)
    trained.save_pretrained(tmp_path)
    with open(tmp_path / INDEX_NAME) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == set(trained_params(trained)) and set(weight_map.values()) == {"adapter_model.safetensors"}

    # What Trainer's resume does with that index: load_state_dict(<PEFT-keyed file>, strict=False).
    model = fused_model(lora_seed=4)
    model.load_state_dict(load_file(tmp_path / "adapter_model.safetensors"), strict=False)
    for n, p in trained_params(model).items():
        torch.testing.assert_close(p, trained_params(trained)[n], rtol=0, atol=0, msg=n)
    # A PEFT key that names nothing in the model is an error even with strict=False, never silently skipped.
    bad = {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(RuntimeError, match="k_proj.lora_A.weight"):
        model.load_state_dict(bad, strict=False)


def test_save_pretrained_takes_the_adapter_from_a_given_state_dict(tmp_path):
    # Trainer passes a gathered state dict under DeepSpeed / FSDP: the adapter written must be that one.
    model = fused_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.layers.1.self_attn.v_proj.lora_B"] += 1.0
    model.save_pretrained(tmp_path, state_dict=sd)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    torch.testing.assert_close(saved[key], sd["model.layers.1.self_attn.v_proj.lora_B"])
    assert not torch.equal(saved[key], model.model.layers[1].self_attn.v_proj.lora_B.detach())
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES | {INDEX_NAME}


def test_a_deep_copy_saves_its_own_adapter(tmp_path):
    # TRL and accelerate deep-copy models (e.g. a reference model): the copy's save_pretrained must write the
    # copy's adapter, not the original's.
    model = fused_model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    twin.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(saved[key], twin.model.layers[0].self_attn.q_proj.lora_B.detach())
    assert not torch.equal(saved[key], model.model.layers[0].self_attn.q_proj.lora_B.detach())
    # and the copy's load hook fills the copy
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(saved, strict=False)
    torch.testing.assert_close(fresh.model.layers[0].self_attn.q_proj.lora_B, saved[key])


def test_load_best_model_at_end_needs_full_model_checkpoints(tmp_path):
    # Trainer's best-model loader only takes an adapter checkpoint from a PeftModel; ours fails, as transformers'
    # own PeftAdapterMixin adapters do. disable_adapter_checkpoints goes back to full-model checkpoints.
    kw = {"max_steps": 2, "save_steps": 1, "eval_strategy": "steps", "eval_steps": 1, "load_best_model_at_end": True}
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        Trainer(model=fused_model(), args=args(tmp_path / "adapter", **kw), train_dataset=dataset(),
                eval_dataset=dataset(n=2)).train()
    model = disable_adapter_checkpoints(fused_model())
    trainer = Trainer(model=model, args=args(tmp_path / "full", **kw), train_dataset=dataset(),
                      eval_dataset=dataset(n=2))
    trainer.train()
    assert "model.safetensors" in os.listdir(trainer.state.best_model_checkpoint)
    lk.inject_lora(model, lk.LoraConfig(r=2, target_modules=["k_proj"]))  # stays off
    model.save_pretrained(tmp_path / "again")
    assert "model.safetensors" in os.listdir(tmp_path / "again")


# -- several adapters ------------------------------------------------------------------------------------------

def two_adapters(first="default", lora_seed=0):
    """Adapter `first` (r=4 on q/v, apply_fused_lora's when it is "default") and "b" (r=6, another alpha and
    dropout, on q/k: shares q_proj), both trainable."""
    cfg_a = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1,
             "init_lora_weights": False}
    cfg_b = lk.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "k_proj"], lora_dropout=0.05,
                          init_lora_weights=False)
    model = base_model()
    torch.manual_seed(lora_seed)
    if first == "default":
        apply_fused_lora(model, **cfg_a)
    else:
        lk.inject_lora(model, lk.LoraConfig(**cfg_a), adapter_name=first)
    return lk.inject_lora(model, cfg_b, adapter_name="b")


def peft_two_adapters(first):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                        adapter_name=first)
    pm.add_adapter("b", LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "k_proj"]))
    return pm


def adapter_files(directory):
    """Relative paths of the PEFT files under `directory`."""
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, files in os.walk(directory)
                  for f in files if f in ADAPTER_FILES)


@pytest.mark.parametrize("first", ["default", "chat"])
def test_save_pretrained_writes_every_adapter_in_peft_layout_and_peft_loads_each(tmp_path, first):
    model = two_adapters(first).eval()
    want = trained_params(model)
    model.save_pretrained(tmp_path / "ours")
    peft_two_adapters(first).save_pretrained(tmp_path / "peft")
    # PEFT's layout file for file: "default" at the root, every other adapter in a subfolder named after it.
    assert adapter_files(tmp_path / "ours") == adapter_files(tmp_path / "peft")
    assert not set(os.listdir(tmp_path / "ours")) & FULL_MODEL_FILES
    # The public function for any model writes the same adapter folders (without Trainer's index file).
    any_dir = str(tmp_path / "any")
    assert lk.save_adapters(model, any_dir) == {n: any_dir if n == "default" else os.path.join(any_dir, n)
                                                for n in (first, "b")}
    assert adapter_files(tmp_path / "any") == adapter_files(tmp_path / "peft")

    x = dataset(n=2)[0]["input_ids"][None]
    root = str(tmp_path / "ours" / first) if first != "default" else str(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(base_model(), root, adapter_name=first)
    pm.load_adapter(str(tmp_path / "ours" / "b"), adapter_name="b")
    pm.eval()
    with torch.no_grad():
        for name in (first, "b"):
            lk.set_adapter(model, name)
            pm.set_adapter(name)
            assert_rel_close(pm(x).logits, model(x).logits, rel=1e-5, what=f"PEFT adapter {name}")
        assert not torch.allclose(pm(x).logits, base_model()(x).logits)

    # What Trainer's resume reads: every adapter, bit for bit, into a model whose adapters were initialised
    # differently (the first adapter of k_proj is b: names differ per layer).
    fresh = two_adapters(first, lora_seed=5)
    load_sharded_checkpoint(fresh, tmp_path / "ours", strict=False)
    got = trained_params(fresh)
    assert got.keys() == want.keys() and any(".lora_As.b" in n for n in got) and any(".k_proj.lora_A" in n for n in got)
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0, msg=n)
    if first != "default":
        # PEFT-keyed tensors through load_state_dict fill "default"; without one, which adapter they belong to is
        # ambiguous: an error.
        with pytest.raises(RuntimeError, match=r"several adapters \['chat', 'b'\], none named 'default'"):
            fresh.load_state_dict(load_file(tmp_path / "ours" / first / "adapter_model.safetensors"), strict=False)
    if first == "default":
        # A gathered state dict (DeepSpeed / FSDP) is where every adapter's tensors come from.
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["model.layers.1.self_attn.q_proj.lora_Bs.b"] += 1.0
        model.save_pretrained(tmp_path / "sd", state_dict=sd)
        key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
        torch.testing.assert_close(load_file(tmp_path / "sd" / "b" / "adapter_model.safetensors")[key],
                                   sd["model.layers.1.self_attn.q_proj.lora_Bs.b"])
        fresh = two_adapters(first, lora_seed=5)
        load_sharded_checkpoint(fresh, tmp_path / "sd", strict=False)
        torch.testing.assert_close(fresh.model.layers[1].self_attn.q_proj.lora_Bs["b"],
                                   sd["model.layers.1.self_attn.q_proj.lora_Bs.b"], rtol=0, atol=0)
    # lk.save_adapter keeps asking which adapter, and says how to save them all.
    with pytest.raises(ValueError, match=r"several adapters .*pass adapter_name=.*save_pretrained"):
        lk.save_adapter(model, tmp_path / "one")


def with_adapter_names(rows):
    """Rows of the mixed-batch dataset: each sample names its adapter (None: the base model)."""
    names = ["default", "b", None, "b", "default", "default", "b", None]
    return [{**row, "adapter": names[i % len(names)]} for i, row in enumerate(rows)]


def mixed_trainer(model, output_dir):
    """The recipe of docs/peft_transformers.md: the collator keeps each row's adapter name, compute_loss runs the
    batch under batch_adapters."""
    from transformers import default_data_collator

    def collate(rows):
        batch = default_data_collator([{k: v for k, v in r.items() if k != "adapter"} for r in rows])
        batch["adapter"] = [r["adapter"] for r in rows]
        return batch

    class MixedAdapterTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with lk.batch_adapters(model, inputs.pop("adapter")):
                return super().compute_loss(model, inputs, *args, **kwargs)

    # remove_unused_columns=False: else Trainer drops the "adapter" column, which the model's forward does not take.
    return MixedAdapterTrainer(model=model, args=args(output_dir, max_steps=4, save_steps=2,
                                                                 remove_unused_columns=False),
                               train_dataset=with_adapter_names(dataset()), data_collator=collate)


def test_mixed_batches_of_two_adapters_resume_exactly(tmp_path):
    full = two_adapters()
    start = trained_params(full)
    full_trainer = mixed_trainer(full, tmp_path / "full")
    full_trainer.train()
    end = trained_params(full)
    for adapter in ("lora_A", "lora_As.b"):  # both adapters trained in the mixed batches
        assert any(adapter in n and not torch.equal(p, start[n]) for n, p in end.items()), adapter

    ckpt = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert ADAPTER_FILES <= files and not files & FULL_MODEL_FILES, files
    assert set(os.listdir(ckpt / "b")) == ADAPTER_FILES
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-2")
    resumed = two_adapters(lora_seed=1)
    trainer = mixed_trainer(resumed, tmp_path / "resumed")
    steps = StepRecorder()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=True)

    assert steps.seen == [3, 4] and trainer.state.global_step == 4

    assert_resumed_like_full(trainer, full_trainer, resumed, end, steps=4)
