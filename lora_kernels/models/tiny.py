"""The built-in default model: a 2-layer, 128-wide Llama over the byte tokenizer (about 0.5M parameters).

It is built from a config (nothing is downloaded), so `lora-kernels finetune` and the tests run anywhere.
"""
from __future__ import annotations

import torch

from ..data.tokenizer import ByteTokenizer


def tiny_llama_config(seq_len: int):
    """initializer_range=0.1 (HF's default is 0.02) gives the frozen random base logits large enough that an
    adapter on its linear layers can move the loss a long way in a few hundred CPU steps."""
    from transformers import LlamaConfig

    tok = ByteTokenizer()
    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(seq_len, 128),
                       initializer_range=0.1, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_tiny_model(seq_len: int, seed: int = 0):
    """(model, tokenizer): the tiny Llama with weights drawn from `seed` only (the global RNG is left untouched)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(seq_len))
    return model, ByteTokenizer()
