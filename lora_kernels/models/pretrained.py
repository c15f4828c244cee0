"""A local transformers causal-LM directory and its tokenizer (never a download)."""
from __future__ import annotations

import os

from ..data.tokenizer import ByteTokenizer
from .quiet import no_progress_bars


def load_pretrained(path: str, dtype=None, quantization=None, device=None):
    """(model, tokenizer) from a directory written by save_pretrained; the byte tokenizer where one is saved.

    dtype: the frozen base's dtype ("auto": the checkpoint's own; with `quantization`, that of the modules left
    unquantized). quantization: a models.quantized.Quantization to load the linear layers 4-bit through
    transformers + bitsandbytes, placed (and quantized) on `device`. Every problem is a ValueError naming the path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r}: not a transformers model directory (no config.json)")
    try:
        with no_progress_bars():
            kwargs = {}
            if quantization is not None:
                kwargs = dict(quantization_config=quantization.bnb_config(), device_map={"": str(device or "cpu")})
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r}: cannot load the model: {err}") from None
    if ByteTokenizer.is_saved_in(path):
        return model, ByteTokenizer.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r}: cannot load the tokenizer: {err}") from None
    return model, tok
