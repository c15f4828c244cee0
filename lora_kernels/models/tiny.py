"""The built-in models: the default 2-layer, 128-wide Llama over the byte tokenizer (about 0.5M parameters), and
`tiny-moe`, a 2-layer, 64-wide Qwen3-MoE (8 experts, top-2) for LoRA on experts (--target-parameters).

It is built from a config (nothing is downloaded), so `lora-kernels finetune` and the tests run anywhere.
"""
from __future__ import annotations

import torch

from ..data.tokenizer import ByteTokenizer
from .quiet import no_progress_bars

TINY_MAX_POSITIONS = 2048


def tiny_llama_config(seq_len: int):
    """initializer_range=0.1 (HF's default is 0.02) gives the frozen random base logits large enough that an
    adapter on its linear layers can move the loss a long way in a few hundred CPU steps.

    max_position_embeddings covers seq_len up to TINY_MAX_POSITIONS; RoPE computes positions, so longer rows
    still run, but a --seq-len far beyond what this model is for then draws a warning."""
    from transformers import LlamaConfig

    tok = ByteTokenizer()
    positions = min(max(seq_len, 128), TINY_MAX_POSITIONS)
    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions,
                       initializer_range=0.1, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def tiny_moe_config(seq_len: int):
    """A Qwen3-MoE of the tiny Llama's kind: byte vocabulary, initializer_range=0.1, every layer sparse."""
    from transformers import Qwen3MoeConfig

    tok = ByteTokenizer()
    positions = min(max(seq_len, 128), TINY_MAX_POSITIONS)
    return Qwen3MoeConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=positions, initializer_range=0.1, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_tiny_model(seq_len: int, seed: int = 0, moe: bool = False):
    """(model, tokenizer): the tiny Llama (moe: the tiny Qwen3-MoE) with weights drawn from `seed` only (the global
    RNG is left untouched)."""
    from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(tiny_moe_config(seq_len)) if moe else LlamaForCausalLM(tiny_llama_config(seq_len))
    return model, ByteTokenizer()


def save_tiny_base(model, tokenizer, directory: str) -> None:
    """Save the random base beside a run: merge and PEFT load it from there."""
    with no_progress_bars():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
