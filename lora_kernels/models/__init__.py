"""Models the command line trains: the built-in tiny Llama and local transformers directories."""
from .positions import check_seq_len, max_positions
from .pretrained import load_pretrained
from .tiny import build_tiny_model, save_tiny_base, tiny_llama_config

__all__ = ["build_tiny_model", "check_seq_len", "load_pretrained", "max_positions", "save_tiny_base",
           "tiny_llama_config"]
