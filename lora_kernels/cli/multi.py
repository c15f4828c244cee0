"""finetune with several adapters (--adapter NAME=FILE ...): the flags checked, each file loaded, the report."""
from __future__ import annotations

import os
from typing import Dict, Optional

from ..names import adapter_name_problem
from .common import BASE_SUBDIR, CLIError, rows_report

RESERVED_NAMES = (BASE_SUBDIR, "checkpoints", "__base__")  # folders a run writes itself; PEFT's base-row name


def adapter_specs(args) -> Optional[Dict[str, str]]:
    """{name: data file} of the --adapter flags in the order given (None without any), each checked."""
    if not args.adapter:
        return None
    if args.data:
        raise CLIError("--adapter and --data both give training data: pass --data for one adapter, or "
                       "--adapter NAME=FILE for each of several")
    if args.eval_data:
        raise CLIError("--eval-data is for a --data run; with --adapter each adapter holds out --eval-fraction "
                       "of its own file")
    if args.quantize:
        raise CLIError("--adapter with --quantize is not supported: a 4-bit (QLoRA) layer holds one adapter; mixed "
                       "batches of several adapters run on a dense base")
    specs: Dict[str, str] = {}
    seen: Dict[str, str] = {}
    for value in args.adapter:
        name, sep, path = value.partition("=")
        if not sep:
            raise CLIError(f"--adapter {value!r}: expected NAME=FILE, e.g. --adapter sql=sql.jsonl")
        if not name:
            raise CLIError(f"--adapter {value!r}: the adapter name before '=' is empty")
        if adapter_name_problem(name):
            raise CLIError(f"--adapter {value!r}: the name {adapter_name_problem(name)} (it names the folder "
                           "OUTPUT_DIR/NAME)")
        if name in RESERVED_NAMES:
            raise CLIError(f"--adapter {value!r}: {name!r} is reserved (the run uses OUTPUT_DIR/{BASE_SUBDIR} and "
                           "OUTPUT_DIR/checkpoints; __base__ means the base model): choose another name")
        if name.lower() in seen:  # a case-insensitive filesystem would put both in one folder
            raise CLIError(f"--adapter {value!r}: the name {name!r} is already given ({seen[name.lower()]!r})")
        if not path:
            raise CLIError(f"--adapter {value!r}: no data file after '='")
        if not os.path.isfile(path):
            raise CLIError(f"--adapter {value!r}: no such file {path!r}")
        seen[name.lower()] = name
        specs[name] = path
    return specs


def load_adapter_data(specs: Dict[str, str], tok, args, say, world: int):
    """({name: training rows}, {name: held-out rows}) with each file packed and split as a --data run's."""
    from ..data import load_packed, split_eval

    train, held = {}, {}
    for name, path in specs.items():
        train[name], ev = load_packed(path, tok, args.seq_len), None
        if args.eval_fraction > 0:
            train[name], ev = split_eval(train[name], args.eval_fraction, seed=args.seed, in_place=True)
        if ev is not None:
            held[name] = ev
        say(f"data: adapter {name}: {path}: {rows_report(train[name], ev, args, world)}")
    say(f"each micro-batch: {args.batch_size} rows of each of the {len(specs)} adapters")
    return train, held or None


def adapters_report(specs: Dict[str, str], result, output_dir: str) -> str:
    """Per adapter: its final train (and eval) loss and its folder."""
    last = result.history[-1] if result.history else {}
    evals = [r for r in result.history if "eval_loss" in r]
    lines = []
    for name in specs:
        loss = last.get(f"loss/{name}", float("nan"))
        ev = evals[-1].get(f"eval_loss/{name}") if evals else None
        lines.append(f"  {name}: loss {loss:.3f}" + (f", eval loss {ev:.3f}" if ev is not None else "")
                     + f" -> {os.path.join(output_dir, name)}/")
    return "adapters (PEFT format, one folder each):\n" + "\n".join(lines)

