"""A local transformers causal-LM directory and its tokenizer (never a download, never the folder's own code).

A model folder can ship Python (config.json's auto_map naming a .py file beside it) that transformers runs when
asked to trust it, and pickled weights (pytorch_model.bin) whose loading can call any function: both are
refused with the reason, and every load passes trust_remote_code=False.
"""
from __future__ import annotations

import glob
import json
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

    check_loadable(path)
    try:
        with no_progress_bars():
            kwargs = {}
            if quantization is not None:
                kwargs = dict(quantization_config=quantization.bnb_config(), device_map={"": str(device or "cpu")})
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                         trust_remote_code=False, **kwargs)
    except (OSError, ValueError, ImportError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path!r}: cannot load the model: {_first_line(err)}") from None
    if ByteTokenizer.is_saved_in(path):
        return model, ByteTokenizer.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path!r}: cannot load the tokenizer: {_first_line(err)}") from None
    return model, tok


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_loadable(path: str) -> None:
    """ValueError naming the reason where `path` is not a model folder we load: no config.json, a config that
    asks for the folder's own code, or weights only as pickles."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path!r}: not a transformers model directory (no config.json)")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{config_file}: not a readable JSON config ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    if config.get("auto_map"):  # transformers would import (and so run) the .py files it names
        code = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(path), "*.py")))
        raise ValueError(f"{path!r}: refused: config.json's auto_map asks for the folder's own model code"
                         f"{' (' + ', '.join(code[:3]) + ')' if code else ''}, which lora_kernels never runs "
                         "(trust_remote_code=False); use a model whose architecture transformers implements")
    names = os.listdir(path)
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{path!r}: the weights are pickles ({', '.join(pickles[:3])}), which are not loaded "
                         "because loading one can run arbitrary code; save the model as safetensors "
                         "(save_pretrained(..., safe_serialization=True))")
