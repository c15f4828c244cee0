"""TRL's SFTTrainer and DPOTrainer (the seeds' DPO walk-through) on fused LoRA: a PEFT model passed through
fuse_peft_model, and an apply_fused_lora model. Tiny Llama and a WordLevel tokenizer, both built offline."""
import os

import peft
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import lora_kernels as lk
from lora_kernels.integrations.peft import fuse_peft_model
from lora_kernels.integrations.transformers import apply_fused_lora

WORDS = "the cat dog sat ran on mat rug fast slow is a good bad answer question".split()
SPECIAL = ["<pad>", "<eos>", "<unk>"]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def base_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(SPECIAL) + len(WORDS), pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


def fused_peft():
    model = peft.get_peft_model(base_model(), peft.LoraConfig(**LORA))
    assert len(fuse_peft_model(model).fused) == 4
    return model


def sft_data():
    return Dataset.from_dict({"text": ["the cat sat on the mat", "the dog ran on the rug", "a good answer is fast"] * 4})


def dpo_data():
    return Dataset.from_dict({"prompt": ["the cat", "the dog", "a question"] * 4,
                              "chosen": [" sat on the mat", " ran fast", " is good"] * 4,
                              "rejected": [" is bad", " sat slow", " is a bad answer"] * 4})


def common(tmp_path):
    return {"output_dir": str(tmp_path), "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
            "max_length": 16, "report_to": [], "use_cpu": True, "disable_tqdm": True, "logging_steps": 1,
            "save_strategy": "no"}


@pytest.fixture
def kernel_calls(monkeypatch, count_kernel_calls):
    """The torch backend keeps these multi-step runs quick; the Triton kernels are covered op by op elsewhere."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    return count_kernel_calls


def is_peft_adapter(name):
    return ".lora_" in name and ".default." in name


def is_our_adapter(name):
    return ".lora_" in name


def train_and_check(trainer, model, kernel_calls, is_adapter):
    """Runs the trainer and checks what every run must show: three finite losses, the kernels called, and only
    the adapter's parameters changed (and trainable). Returns the losses."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    assert kernel_calls
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(is_adapter(n) for n in changed), sorted(n for n in changed if not is_adapter(n))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not is_adapter(n))
    return losses


def test_sft_on_a_fused_peft_model(tmp_path, kernel_calls):
    model = fused_peft()
    trainer = SFTTrainer(model=model, args=SFTConfig(**common(tmp_path)), train_dataset=sft_data(),
                         processing_class=tokenizer())
    train_and_check(trainer, model, kernel_calls, is_peft_adapter)


def test_sft_on_an_apply_fused_lora_model_saves_the_adapter(tmp_path, kernel_calls):
    model = apply_fused_lora(base_model(), **LORA)
    trainer = SFTTrainer(model=model, args=SFTConfig(**common(tmp_path)), train_dataset=sft_data(),
                         processing_class=tokenizer())
    train_and_check(trainer, model, kernel_calls, is_our_adapter)
    trainer.save_model()  # SFTTrainer saves through Trainer: the adapter in PEFT's format, not the model
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files


def test_dpo_on_a_fused_peft_model_uses_no_second_base(tmp_path, kernel_calls):
    # The seeds' walk-through: get_peft_model, then DPOTrainer(ref_model=None). TRL takes the reference from the
    # same model (a frozen copy of the adapter, "ref", switched in for the reference pass), not a second base.
    model = fused_peft()
    trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**common(tmp_path)), train_dataset=dpo_data(),
                         processing_class=tokenizer())
    assert trainer.ref_model is None and "ref" in model.peft_config
    # Checked after TRL added the "ref" adapter, which must stay frozen.
    train_and_check(trainer, model, kernel_calls, is_peft_adapter)


def test_dpo_on_an_apply_fused_lora_model_references_the_adapter_disabled_model(tmp_path, kernel_calls):
    # TRL recognises only PeftModel for its adapter-off reference. The one-line way for our model:
    # precompute_ref_log_probs=True computes the reference log-probs once, before the first step, from this
    # model, whose fresh adapters (lora_B = 0) leave it equal to the base. No second copy of the base exists.
    model = apply_fused_lora(base_model(), **LORA)
    trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**common(tmp_path), precompute_ref_log_probs=True),
                         train_dataset=dpo_data(), processing_class=tokenizer())
    assert trainer.ref_model is None
    first = train_and_check(trainer, model, kernel_calls, is_our_adapter)[0]
    assert abs(first - torch.log(torch.tensor(2.0)).item()) < 1e-5  # policy == reference at step 1

    # The stored reference is the adapter-disabled model's, also after training has moved the adapters.
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    with torch.no_grad(), lk.disable_adapter(model):
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(chosen, batch["ref_chosen_logps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected, batch["ref_rejected_logps"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy_chosen, _ = trainer.compute_ref_log_probs(model, batch)
    assert not torch.allclose(policy_chosen, chosen, rtol=1e-5, atol=1e-5)  # the adapters did move
