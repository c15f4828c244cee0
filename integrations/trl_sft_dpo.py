"""TRL: supervised fine-tuning, then DPO, on a PEFT model whose LoRA layers run on the fused kernels.

get_peft_model + fuse_peft_model, then TRL's SFTTrainer and DPOTrainer as usual. With ref_model=None, DPOTrainer
copies the (SFT-trained) adapter into a frozen "ref" adapter of the same model for the reference pass: no second
copy of the base. A tiny Llama and a word-level tokenizer, both built in memory (no download).

    python integrations/trl_sft_dpo.py [OUTPUT_DIR]      # OUTPUT_DIR defaults to a new temporary directory
"""
import math
import os
import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from lora_kernels.integrations.peft import fuse_peft_model

WORDS = ["<pad>", "<eos>", "<unk>"] + "the cat dog sat ran on mat rug fast slow is a good bad answer".split()


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def fused_peft_model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(WORDS),
                                        pad_token_id=0, eos_token_id=1, bos_token_id=None))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    print(f"fused {len(fuse_peft_model(model).fused)} LoRA layers")
    return model


def args(config_class, out, steps):
    return config_class(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-2,
                        max_length=16, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                        use_cpu=not torch.cuda.is_available())


def losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def main(out):
    model, tok = fused_peft_model(), tokenizer()

    sft_data = Dataset.from_dict({"text": ["the cat sat on the mat", "the dog ran on the rug"] * 8})
    sft = SFTTrainer(model=model, args=args(SFTConfig, os.path.join(out, "sft"), 8), train_dataset=sft_data,
                     processing_class=tok)
    sft.train()
    first, last = losses(sft)[0], losses(sft)[-1]
    print(f"SFT loss: {first:.3f} -> {last:.3f}")

    dpo_data = Dataset.from_dict({"prompt": ["the cat", "the dog"] * 8,
                                  "chosen": [" sat on the mat", " ran fast"] * 8,
                                  "rejected": [" is bad", " sat slow"] * 8})
    dpo = DPOTrainer(model=model, ref_model=None, args=args(DPOConfig, os.path.join(out, "dpo"), 8),
                     train_dataset=dpo_data, processing_class=tok)
    dpo.train()
    d_first, d_last = losses(dpo)[0], losses(dpo)[-1]
    print(f"DPO loss: {d_first:.3f} -> {d_last:.3f} (starts at log 2 = {math.log(2):.3f}: policy == reference)")
    print(f"adapters on the model: {sorted(model.peft_config)}")   # "ref": TRL's frozen reference copy

    model.save_pretrained(os.path.join(out, "adapter"))   # PEFT's files; "ref" in a subfolder
    if not (last < first and d_last < d_first and abs(d_first - math.log(2)) < 1e-4):
        sys.exit("the losses did not behave as expected")
    print("OK: SFT and DPO trained the fused PEFT model")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trl_sft_dpo_"))
