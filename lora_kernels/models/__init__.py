"""Models the command line trains: the built-in tiny Llama and local transformers directories."""
from .pretrained import load_pretrained
from .tiny import build_tiny_model, tiny_llama_config

__all__ = ["build_tiny_model", "load_pretrained", "tiny_llama_config"]
