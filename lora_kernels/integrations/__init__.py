"""Shims for Hugging Face libraries, importable as lora_kernels.integrations.{peft,transformers}.

Each submodule imports its library lazily on import of that submodule only, so `import lora_kernels` never
needs peft or transformers.
"""
