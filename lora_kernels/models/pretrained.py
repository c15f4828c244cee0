"""A local transformers causal-LM directory and its tokenizer (never a download)."""
from __future__ import annotations

import os

from ..data.tokenizer import ByteTokenizer


def load_pretrained(path: str, dtype=None):
    """(model, tokenizer) from a directory written by save_pretrained; the byte tokenizer where one is saved.

    dtype: the frozen base's dtype ("auto": the checkpoint's own). Every problem is a ValueError naming the path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r}: not a transformers model directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r}: cannot load the model: {err}") from None
    if ByteTokenizer.is_saved_in(path):
        return model, ByteTokenizer.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r}: cannot load the tokenizer: {err}") from None
    return model, tok
