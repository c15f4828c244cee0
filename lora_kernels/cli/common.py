"""What every command shares: user-facing errors, argument types, the names a run uses for its folders."""
from __future__ import annotations

import argparse
import os

TINY = "tiny"
TINY_MOE = "tiny-moe"  # the built-in tiny Qwen3-MoE (LoRA on experts: --target-parameters)
BUILTIN = (TINY, TINY_MOE)
BASE_SUBDIR = "base_model"
TINY_LR, DEFAULT_LR = 2e-3, 2e-4
WARMUP_STEPS = 10  # --warmup-steps when not given
# The library's values, repeated so that --help imports no torch (tests/test_cli_errors.py checks they agree):
# models.quantized.QUANT_TYPES, training.loop.EVAL_MAX_BATCHES, training.resources.SMALL_MODEL_WIDTH.
QUANT_TYPES = ("nf4", "fp4")
EVAL_MAX_BATCHES = 16
SMALL_MODEL_WIDTH = 1024
DTYPES = ("float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user-facing error: printed as `lora-kernels <cmd>: error: ...` with exit status 2."""


class CLIInterrupted(Exception):
    """Ctrl-C: printed as `lora-kernels <cmd>: <message>` with exit status 130 (128 + SIGINT, as shells do)."""


def user_error(fn, *args, **kwargs):
    """fn(...), with a ValueError (the library's way of saying "bad input") turned into a CLIError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise CLIError(str(err)) from None


# -- argument types -------------------------------------------------------------------------------
def target_modules_arg(value: str):
    """'all-linear', a comma list (q_proj,v_proj) or a regex (anything with regex characters)."""
    if value == "all-linear" or any(c in value for c in "\\^$*+?()[]{}|"):
        return value
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"--target-modules {value!r} names no module")
    return items


def name_list_arg(value: str):
    """A comma list of names (--target-parameters)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{value!r} names nothing")
    return items


def arg_type(cast, accept, rule: str):
    """An argparse `type` that parses with `cast` and accepts values for which `accept` holds."""
    expected = "an integer" if cast is int else "a number"

    def parse(v: str):
        try:
            n = cast(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v!r}") from None
        if not accept(n):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {n}")
        return n

    return parse


positive_int = arg_type(int, lambda i: i >= 1, ">= 1")
seq_len_arg = arg_type(int, lambda i: i >= 2, ">= 2 (a row predicts each next token)")
nonneg_int = arg_type(int, lambda i: i >= 0, ">= 0")
fraction = arg_type(float, lambda f: 0.0 <= f < 1.0, "in [0, 1)")
positive_float = arg_type(float, lambda f: 0.0 < f < float("inf"), "a finite number > 0")
seed_arg = arg_type(int, lambda s: 0 <= s < 2**64, "in [0, 2**64) (torch's seeds are 64-bit)")


# -- what the commands share ------------------------------------------------------------------------
def load_model(path: str, dtype, quant=None, device=None):
    from ..models import load_pretrained

    if not os.path.exists(path):
        raise CLIError(f"--model {path!r}: no such directory (give a local transformers model directory, "
                       f"or {TINY!r} for the built-in default)")
    try:
        return load_pretrained(path, dtype=dtype, quantization=quant, device=device)
    except ValueError as err:
        raise CLIError(f"--model {err}") from None


def rows_report(train_ds, eval_ds, args, world: int) -> str:
    held_out = ""
    if eval_ds is not None:
        per_eval = min(len(eval_ds), args.eval_max_batches * args.batch_size * world or len(eval_ds))
        held_out = f", {len(eval_ds)} for eval ({per_eval} evaluated each time)"
    return f"{len(train_ds)} rows of {args.seq_len} tokens for training{held_out}"
