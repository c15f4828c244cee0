"""`lora-kernels merge`: an adapter merged into its base, saved as a plain transformers model."""
from __future__ import annotations

import os

from .common import CLIError, load_model, user_error

def cmd_merge(args) -> int:
    from .. import load_adapter, merge_and_unload
    from ..models import stored_quantization
    from ..training.rundir import check_merge_output, check_writable

    if not os.path.isdir(args.adapter) or not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        inside = sorted(d for d in os.listdir(args.adapter) if os.path.isfile(
            os.path.join(args.adapter, d, "adapter_config.json"))) if os.path.isdir(args.adapter) else []
        if inside:  # a multi-adapter finetune's output directory
            raise CLIError(f"--adapter {args.adapter!r} holds several adapters ({', '.join(inside)}): pass one "
                           f"of them, e.g. --adapter {os.path.join(args.adapter, inside[0])}")
        raise CLIError(f"--adapter {args.adapter!r}: not an adapter directory (no adapter_config.json)")
    method = stored_quantization(args.model)
    if method is not None:  # merging would re-quantize W + s·B·A, and the result would not be the merged model
        raise CLIError(f"--model {args.model!r} is stored quantized ({method}): merge into the full-precision "
                       "base the adapter was trained on (for a --quantize run of the tiny model: "
                       "OUTPUT_DIR/base_model)")
    user_error(check_merge_output, args.model, args.adapter, args.output_dir, args.overwrite)
    user_error(check_writable, args.output_dir)
    model, tok = load_model(args.model, dtype="auto")  # merge in the checkpoint's own dtype, as PEFT does
    try:
        load_adapter(model, args.adapter, is_trainable=False)
    except (ValueError, OSError) as err:
        raise CLIError(str(err)) from None
    model = merge_and_unload(model)
    model.save_pretrained(args.output_dir)
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(args.output_dir)
    print(f"merged {args.adapter} into {args.model}: {args.output_dir} "
          "(load with AutoModelForCausalLM.from_pretrained)")
    return 0



def add_parser(sub, fmt) -> None:
    """The merge subcommand and its flags."""
    m = sub.add_parser("merge", formatter_class=fmt, help="merge an adapter into its base model",
                       description="Load a base model, apply an adapter (PEFT format) and save the merged model "
                       "with save_pretrained; the result loads with AutoModelForCausalLM alone.")
    m.add_argument("--model", required=True, help="the base model directory (for a 'tiny' run: OUTPUT_DIR/base_model)")
    m.add_argument("--adapter", required=True, help="the adapter directory (a finetune --output-dir or a PEFT save)")
    m.add_argument("--output-dir", required=True, help="where to write the merged model: never --model, a folder "
                   "inside it, the adapter's folder or a run's folder")
    m.add_argument("--overwrite", action="store_true", help="replace a merged model already in --output-dir")
    m.set_defaults(func=cmd_merge)
