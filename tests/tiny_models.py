"""Tiny transformers / PEFT models built from a config (never downloaded) for the integration tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128


def tiny_llama(seed=0, attention_bias=False, dtype=torch.float32, hidden_size=48, intermediate_size=96):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, attention_bias=attention_bias)
    return LlamaForCausalLM(cfg).to(dtype)


def tokens(batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def peft_lora_names(peft_model):
    """{module path in the base model: lora.Linear layer} of a PEFT model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer):
            out[name.removeprefix("base_model.model.")] = m
    return out


def peft_lora_grads(peft_model):
    """{(module path, 'lora_A'|'lora_B'): grad} of a PEFT model's default adapter."""
    out = {}
    for name, layer in peft_lora_names(peft_model).items():
        out[(name, "lora_A")] = layer.lora_A["default"].weight.grad
        out[(name, "lora_B")] = layer.lora_B["default"].weight.grad
    return out


def lk_lora_grads(model):
    from lora_kernels.inject import lora_layers

    out = {}
    for name, layer in lora_layers(model).items():
        out[(name, "lora_A")] = layer.lora_A.grad
        out[(name, "lora_B")] = layer.lora_B.grad
    return out


def assert_rel_close(a, b, rel=1e-4, what=""):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"
