"""A 4-bit (QLoRA) base: the transformers + bitsandbytes quantization settings the command line loads with.

The base goes through transformers' own quantized loading (from_pretrained with a BitsAndBytesConfig), for the
built-in tiny model too (it is loaded back from the directory it was saved to), so a run gets exactly the
bnb Linear4bit layers a user loading a real checkpoint gets; inject_lora then puts FusedLoraLinear4bit over them.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import NamedTuple, Optional

QUANT_TYPES = ("nf4", "fp4")


def require_bitsandbytes() -> None:
    """A ValueError saying how to get bitsandbytes when it cannot be imported (checked before a run writes
    anything; transformers would only say so once loading has begun)."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ValueError(f"--quantize needs bitsandbytes, which cannot be imported ({err}): "
                         "pip install bitsandbytes") from None


class Quantization(NamedTuple):
    """bnb_4bit_quant_type, bnb_4bit_use_double_quant and bnb_4bit_compute_dtype (the run's compute dtype)."""
    quant_type: str
    double_quant: bool
    compute_dtype: object   # a torch.dtype
    quant_storage: object = None   # bnb_4bit_quant_storage: a float dtype lets FSDP2 shard the packed bytes

    def describe(self) -> str:
        return f"4-bit {self.quant_type}" + (" + double quant" if self.double_quant else "")

    def bnb_config(self):
        """transformers' BitsAndBytesConfig for these settings."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"--quantize {self.quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype,
                                  **({"bnb_4bit_quant_storage": self.quant_storage} if self.quant_storage else {}))

    def python_source(self) -> str:
        """The same settings as Python a user pastes to load the base as the run did."""
        return (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={self.quant_type!r}, "
                f"bnb_4bit_use_double_quant={self.double_quant}, bnb_4bit_compute_dtype={self.compute_dtype}"
                + (f", bnb_4bit_quant_storage={self.quant_storage})" if self.quant_storage else ")"))


def stored_quantization(path: str) -> Optional[str]:
    """The quantization method a saved model's config.json records (its weights are stored quantized:
    bitsandbytes, GPTQ, ...), or None for a full-precision checkpoint (or no readable config.json)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not q:
        return None
    return str(q.get("quant_method", "quantized")) if isinstance(q, dict) else "quantized"
