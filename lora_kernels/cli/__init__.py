"""`lora-kernels`: finetune, merge, check and bench from the command line.

    lora-kernels finetune --output-dir out/demo            # built-in tiny Llama on the shipped demo data
    lora-kernels finetune --model path/to/hf-model --data train.jsonl --output-dir out/run
    lora-kernels finetune --adapter sql=sql.jsonl --adapter chat=chat.jsonl --output-dir out/two   # out/two/sql/, ...
    lora-kernels merge --model path/to/hf-model --adapter out/run --output-dir out/merged
    lora-kernels check                                     # kernels vs the float64 reference, here
    lora-kernels bench                                     # base vs fused vs PEFT timing, here

One module per command (finetune + finetune_args, merge, check, bench; multi.py for --adapter), the shared
argument types and errors in common.py. The commands parse arguments and call the library, nothing else.
Heavy imports (torch, transformers, triton via lora_kernels) happen inside the commands, so `check` can switch
on Triton's interpreter before Triton compiles anything.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import bench, check, finetune_args, merge
from .common import CLIError, CLIInterrupted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-kernels", description="LoRA fine-tuning on fused Triton kernels.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter
    for command in (finetune_args, merge, check, bench):
        command.add_parser(sub, fmt)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:]  # the subcommand's own flags, for a re-run
    try:
        return args.func(args)
    except CLIError as err:
        print(f"lora-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CLIInterrupted as stop:
        print(f"lora-kernels {args.command}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, merging, checking): nothing half-written
        print(f"lora-kernels {args.command}: interrupted", file=sys.stderr)
        return 130
