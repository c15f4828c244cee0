"""Models the command line trains: the built-in tiny Llama and local transformers directories."""
from .positions import check_seq_len, max_positions
from .pretrained import load_pretrained
from .quantized import QUANT_TYPES, Quantization, require_bitsandbytes, stored_quantization
from .tiny import build_tiny_model, save_tiny_base, tiny_llama_config, tiny_moe_config

__all__ = ["QUANT_TYPES", "Quantization", "build_tiny_model", "check_seq_len", "load_pretrained", "max_positions",
           "require_bitsandbytes", "save_tiny_base", "stored_quantization", "tiny_llama_config", "tiny_moe_config"]
