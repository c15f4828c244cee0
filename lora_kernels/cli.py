"""`lora-kernels`: finetune, merge, check and bench from the command line.

    lora-kernels finetune --output-dir out/demo            # built-in tiny Llama on the shipped demo data
    lora-kernels finetune --model path/to/hf-model --data train.jsonl --output-dir out/run
    lora-kernels finetune --adapter sql=sql.jsonl --adapter chat=chat.jsonl --output-dir out/two   # out/two/sql/, ...
    lora-kernels merge --model path/to/hf-model --adapter out/run --output-dir out/merged
    lora-kernels check                                     # kernels vs the float64 reference, here
    lora-kernels bench                                     # base vs fused vs PEFT timing, here

Heavy imports (torch, transformers, triton via lora_kernels) happen inside the commands, so `--help`
is instant and `check` can switch on Triton's interpreter before Triton compiles anything.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional

TINY = "tiny"
BASE_SUBDIR = "base_model"
TINY_LR, DEFAULT_LR = 2e-3, 2e-4
DTYPES = ("float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user-facing error: printed as `lora-kernels <cmd>: error: ...` with exit status 2."""


class CLIInterrupted(Exception):
    """Ctrl-C: printed as `lora-kernels <cmd>: <message>` with exit status 130 (128 + SIGINT, as shells do)."""


def _user_error(fn, *args, **kwargs):
    """fn(...), with a ValueError (the library's way of saying "bad input") turned into a CLIError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise CLIError(str(err)) from None


# -- argument types ------------------------------------------------------------------------------
def _target_modules(value: str):
    """'all-linear', a comma list (q_proj,v_proj) or a regex (anything with regex characters)."""
    if value == "all-linear" or any(c in value for c in "\\^$*+?()[]{}|"):
        return value
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"--target-modules {value!r} names no module")
    return items


def _arg_type(cast, accept, rule: str):
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


_positive_int = _arg_type(int, lambda i: i >= 1, ">= 1")
_seq_len = _arg_type(int, lambda i: i >= 2, ">= 2 (a row predicts each next token)")
_nonneg_int = _arg_type(int, lambda i: i >= 0, ">= 0")
_fraction = _arg_type(float, lambda f: 0.0 <= f < 1.0, "in [0, 1)")
_positive_float = _arg_type(float, lambda f: 0.0 < f < float("inf"), "a finite number > 0")


# -- finetune ------------------------------------------------------------------------------------
def cmd_finetune(args) -> int:
    import torch

    from . import LoraConfig, inject_lora, save_adapter, trainable_parameters
    from .data import DEMO_PATH, DataError, load_packed, split_eval
    from .layer import DEFAULT_ADAPTER
    from .models import build_tiny_model, check_seq_len, save_tiny_base
    from .training import TrainConfig, Trainer, TrainingInterrupted, init_distributed
    from .training.checkpoint import latest_checkpoint
    from .training.distributed import barrier
    from .training.multi import MultiAdapterTrainer, adapter_outputs
    from .training.resources import choose_threads, model_width, resolve_device
    from .training.rundir import check_writable, refuse_or_clear

    if args.resume is not None and args.overwrite:
        raise CLIError("--resume continues the run in --output-dir and --overwrite replaces it: pass one")
    _check_quantize_flags(args)
    rank, world, device = init_distributed()
    if args.device:
        device = _user_error(resolve_device, args.device)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    specs = _adapter_specs(args)  # {name: data file} of --adapter flags; None for a one-adapter run
    if args.use_dora and specs:
        raise CLIError("--use-dora with several --adapter flags: mixed-adapter batches with DoRA are not "
                       "supported yet")
    data_path = args.data or DEMO_PATH
    for flag, path in (("--data", None if specs else data_path), ("--eval-data", args.eval_data)):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{flag} {path!r}: no such file")
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        raise CLIError(f"--resume {args.resume!r}: no such checkpoint directory")
    _user_error(check_writable, args.output_dir)
    base_dir = os.path.join(args.output_dir, BASE_SUBDIR) if args.model == TINY else os.path.abspath(args.model)
    if args.resume is None:  # before anything is written: a previous run is refused, or cleared on --overwrite
        _user_error(refuse_or_clear, args.output_dir, args.overwrite,
                    extra=((BASE_SUBDIR,) if args.model == TINY else ()) + adapter_outputs(specs or ()), clear=main)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    quant = _quantization(args, precision)

    torch.manual_seed(args.seed)  # LoRA init: the same on every rank (DDP also broadcasts rank 0's)
    if args.model != TINY:
        dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.load_dtype]
        model, tok = _load_model(args.model, dtype=dtype, quant=quant, device=device)
        lr = args.lr if args.lr is not None else DEFAULT_LR
    elif args.resume is not None and os.path.isfile(os.path.join(base_dir, "config.json")):
        # the run's own base, whatever --seed says now
        model, tok = _load_model(base_dir, dtype=torch.float32, quant=quant, device=device)
        lr = args.lr if args.lr is not None else TINY_LR
    else:
        model, tok = build_tiny_model(args.seq_len, seed=args.seed)
        if main:  # the random base is part of the result: merge and PEFT need it
            save_tiny_base(model, tok, base_dir)
        if quant is not None:  # 4-bit through transformers' loader, as a user loads the saved base
            barrier(world)
            model, tok = _load_model(base_dir, dtype=torch.float32, quant=quant, device=device)
        lr = args.lr if args.lr is not None else TINY_LR
    warning = _user_error(check_seq_len, model, args.seq_len)
    if warning and main:
        print(f"lora-kernels finetune: warning: {warning}", file=sys.stderr)
    threads = choose_threads(model_width(model), args.threads) if device.type == "cpu" else None
    if threads:
        torch.set_num_threads(threads)

    cfg = _user_error(LoraConfig, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules, use_rslora=args.use_rslora, use_dora=args.use_dora)
    for name in specs or [DEFAULT_ADAPTER]:
        _user_error(inject_lora, model, cfg, adapter_name=name)
    trainable, total = trainable_parameters(model)
    n = torch.get_num_threads()
    where = f"device {device}" + (f" ({n} intra-op thread{'s' if n > 1 else ''})" if device.type == "cpu" else "")
    say(f"model: {args.model} ({total / 1e6:.2f}M parameters, {trainable / 1e3:.1f}K trainable = "
        f"{100 * trainable / total:.2f}%), {where}, precision {precision}, "
        + (f"base {quant.describe()}, " if quant else "") + f"{world} process(es)")

    try:
        if specs:
            train_ds, eval_ds = _load_adapter_data(specs, tok, args, say, world)
        else:
            train_ds = load_packed(data_path, tok, args.seq_len)
            eval_ds = None
            if args.eval_data:
                eval_ds = load_packed(args.eval_data, tok, args.seq_len)
            elif args.eval_fraction > 0:
                train_ds, eval_ds = split_eval(train_ds, args.eval_fraction, seed=args.seed, in_place=True)
            say(f"data: {data_path}: {_rows_report(train_ds, eval_ds, args, world)}")
    except DataError as err:
        raise CLIError(str(err)) from None

    try:
        tcfg = TrainConfig(output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, lr=lr, weight_decay=args.weight_decay,
                           warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, precision=precision,
                           eval_every=args.eval_every, eval_batches=args.eval_max_batches,
                           save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
                           strategy=args.strategy, overwrite=args.overwrite)
    except ValueError as err:  # e.g. a negative --weight-decay ("weight_decay must be ...")
        raise CLIError(f"invalid option: {err}") from None

    def save(m, directory):
        # Record the base model as PEFT does, so PeftModel.from_pretrained(adapter) finds it.
        save_adapter(m, directory, base_model_name_or_path=os.path.abspath(base_dir), task_type="CAUSAL_LM")

    def save_named(m, directory, name):
        save_adapter(m, directory, adapter_name=name, base_model_name_or_path=os.path.abspath(base_dir),
                     task_type="CAUSAL_LM")

    try:
        if specs:
            trainer = MultiAdapterTrainer(model, train_ds, tcfg, eval_data=eval_ds, save_adapter=save_named,
                                          device=device)
        else:
            trainer = Trainer(model, train_ds, tcfg, eval_data=eval_ds, save_adapter=save, device=device)
        result = trainer.train(resume_from=args.resume)
    except ValueError as err:
        raise CLIError(str(err)) from None
    except OSError as err:  # disk full, a folder made read-only mid-run: the file and the reason, no traceback
        raise CLIError(f"cannot write {err.filename or args.output_dir}: {err.strerror or err}") from None
    except TrainingInterrupted as stop:
        raise CLIInterrupted(f"interrupted at step {stop.step}; continue with --resume") from None
    except KeyboardInterrupt:  # a second Ctrl-C: the newest complete checkpoint is what a resume gets
        latest = latest_checkpoint(args.output_dir)
        raise CLIInterrupted(f"interrupted; continue from {latest} with --resume" if latest else
                             "interrupted before the first checkpoint: nothing to resume") from None
    if result.already_finished:
        say(f"the run in {args.output_dir} is finished: its checkpoint is at step {result.step} and --max-steps "
            f"is {args.max_steps}; nothing to train (raise --max-steps to continue it)")
    elif main:
        first = result.history[0]["loss"] if result.history else float("nan")
        say(f"done: {result.step} steps in {result.seconds:.1f}s, loss {first:.3f} -> {result.loss:.3f}"
            + (f", eval loss {result.eval_loss:.3f}" if result.eval_loss is not None else "")
            + (f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""))
        if specs:
            say(_adapters_report(specs, result, args.output_dir))
        else:
            say(f"adapter (PEFT format): {args.output_dir}/adapter_config.json, adapter_model.safetensors")
        say(f"metrics: {result.metrics_path}" + (f"; loss curve: {result.plot_path}" if result.plot_path else ""))
        say(_how_to_load(base_dir, os.path.join(args.output_dir, next(iter(specs))) if specs else args.output_dir,
                         quant))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _check_quantize_flags(args) -> None:
    """--quantize's companions and conflicts, before anything is loaded or written."""
    from .models import require_bitsandbytes

    if args.double_quant and not args.quantize:
        raise CLIError("--double-quant quantizes the 4-bit base's scales: it needs --quantize nf4|fp4")
    if args.quantize and args.strategy == "fsdp":
        raise CLIError("--quantize with --strategy fsdp is not supported (FSDP2 would shard the packed 4-bit "
                       "weights without their quantization state): use --strategy ddp or one process")
    if args.quantize:
        _user_error(require_bitsandbytes)


def _quantization(args, precision: str):
    """The 4-bit settings of the run (None without --quantize): bnb computes in the run's precision."""
    import torch

    from .models import Quantization

    if not args.quantize:
        return None
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Quantization(args.quantize, args.double_quant, compute)


def _rows_report(train_ds, eval_ds, args, world: int) -> str:
    held_out = ""
    if eval_ds is not None:
        per_eval = min(len(eval_ds), args.eval_max_batches * args.batch_size * world or len(eval_ds))
        held_out = f", {len(eval_ds)} for eval ({per_eval} evaluated each time)"
    return f"{len(train_ds)} rows of {args.seq_len} tokens for training{held_out}"


# -- finetune: several adapters (--adapter NAME=FILE ...) -----------------------------------------
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # it names the folder OUTPUT_DIR/NAME: no separators, no dots
RESERVED_NAMES = (BASE_SUBDIR, "checkpoints", "__base__")  # folders a run writes itself; PEFT's base-row name


def _adapter_specs(args) -> Optional[Dict[str, str]]:
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
        if not ADAPTER_NAME.fullmatch(name):
            raise CLIError(f"--adapter {value!r}: the name may hold only letters, digits, '_' and '-' (it names "
                           "the folder OUTPUT_DIR/NAME)")
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


def _load_adapter_data(specs: Dict[str, str], tok, args, say, world: int):
    """({name: training rows}, {name: held-out rows}) with each file packed and split as a --data run's."""
    from .data import load_packed, split_eval

    train, held = {}, {}
    for name, path in specs.items():
        train[name], ev = load_packed(path, tok, args.seq_len), None
        if args.eval_fraction > 0:
            train[name], ev = split_eval(train[name], args.eval_fraction, seed=args.seed, in_place=True)
        if ev is not None:
            held[name] = ev
        say(f"data: adapter {name}: {path}: {_rows_report(train[name], ev, args, world)}")
    say(f"each micro-batch: {args.batch_size} rows of each of the {len(specs)} adapters")
    return train, held or None


def _adapters_report(specs: Dict[str, str], result, output_dir: str) -> str:
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


def _load_model(path: str, dtype, quant=None, device=None):
    from .models import load_pretrained

    if not os.path.exists(path):
        raise CLIError(f"--model {path!r}: no such directory (give a local transformers model directory, "
                       f"or {TINY!r} for the built-in default)")
    try:
        return load_pretrained(path, dtype=dtype, quantization=quant, device=device)
    except ValueError as err:
        raise CLIError(f"--model {err}") from None


def _how_to_load(base_dir: str, adapter_dir: str, quant=None) -> str:
    header, imports = "", "AutoModelForCausalLM"
    load_base = f"AutoModelForCausalLM.from_pretrained({base_dir!r})"
    if quant is not None:  # the 4-bit base the adapter trained on
        header, imports = "    import torch\n", imports + ", BitsAndBytesConfig"
        load_base = (f"AutoModelForCausalLM.from_pretrained(\n        {base_dir!r},\n"
                     f"        quantization_config={quant.python_source()})")
    return (
        "load it with PEFT:\n"
        f"{header}    from transformers import {imports}\n"
        "    from peft import PeftModel\n"
        f"    base = {load_base}\n"
        f"    model = PeftModel.from_pretrained(base, {adapter_dir!r})\n"
        "or with lora_kernels (fused layers):  lk.load_adapter(base, "
        f"{adapter_dir!r})\n"
        f"merge it:  lora-kernels merge --model {base_dir} --adapter {adapter_dir} --output-dir {adapter_dir}/merged")


# -- merge ---------------------------------------------------------------------------------------
def cmd_merge(args) -> int:
    from . import load_adapter, merge_and_unload
    from .models import stored_quantization
    from .training.rundir import check_writable

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
    _user_error(check_writable, args.output_dir)
    model, tok = _load_model(args.model, dtype="auto")  # merge in the checkpoint's own dtype, as PEFT does
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


# -- check ---------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton picks its interpreter when it is first imported (triton.language's own jit helpers are
        # decorated then), and importing lora_kernels has already imported it: re-run in a child process.
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "lora_kernels.cli", "check", *args.argv], env=env)
    from .parity_check import check_parity, check_parity_4bit

    os.environ["LORA_KERNELS_BACKEND"] = args.backend
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtype or (list(DTYPES) if device.type == "cuda" else ["float32", "float16"])
    results = check_parity(dtypes, device)
    print("fused forward/backward vs the float64 reference; error = max |fused - reference| / max(max |reference|, 1)")
    _print_parity(results)
    try:  # a 4-bit W on every backend with 4-bit kernels (or the one asked for), vs bnb's own dequantization
        results_4bit = check_parity_4bit(dtypes, device, None if args.backend == "auto" else [args.backend])
    except ImportError as err:
        print(f"4-bit (QLoRA) cases skipped: bitsandbytes cannot be imported ({err}); pip install bitsandbytes")
        results_4bit = []
    if results_4bit:
        print("4-bit (QLoRA) base: the reference's W is bitsandbytes' dequantization of the packed weight")
        _print_parity(results_4bit)
    results += results_4bit
    failed = not all(res.ok for res in results)
    interp = " (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    print(("FAILED: errors above tolerance" if failed else "OK: all within tolerance") + interp)
    return 1 if failed else 0


def _print_parity(results) -> None:
    for res in results:
        errors = "; ".join(f"{name} {err:.2e}{'' if err < res.tol else ' FAIL'}" for name, err in res.errors.items())
        print(f"backend={res.backend} device={res.device} dtype={res.dtype}{res.label} shape=(M={res.M}, K={res.K}, "
              f"N={res.N}, r={res.r}{', bias' if res.bias else ''}): {errors} (tolerance {res.tol:.0e})")


# -- bench ---------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    import torch

    from .backends.gemm_dispatch import gemm_choices
    from .layer_bench import BASE, FUSED, PEFT, bench_layers
    from .training.resources import resolve_device

    device = str(_user_error(resolve_device, args.device)) if args.device else None
    res = bench_layers(tokens=args.tokens, in_features=args.in_features, out_features=args.out_features, r=args.r,
                       dropout=args.dropout, dtype=getattr(torch, args.dtype) if args.dtype else None,
                       device=device, min_time=args.min_time)
    if not res.peft_installed:
        print("peft is not installed: skipping the PEFT comparison (pip install peft)")
    print(f"device {res.device} ({res.device_name}), dtype {res.dtype}, x ({res.tokens}, {res.in_features}) -> "
          f"{res.out_features}, r={res.r}, dropout={res.dropout}, backend {res.backend}, "
          f"timer {res.timer}, {res.reps} reps")
    for name, ms in res.median_ms.items():
        print(f"  {name:18s} fwd+bwd {ms:9.3f} ms")
    if PEFT in res.median_ms:
        print(f"  PEFT / fused = {res.median_ms[PEFT] / res.median_ms[FUSED]:.2f}x, "
              f"fused / base = {res.median_ms[FUSED] / res.median_ms[BASE]:.2f}x")
    for key, (path, ms) in gemm_choices().items():  # empty unless LORA_KERNELS_GEMM=auto measured (on a GPU)
        print(f"  GEMM path {key.describe()}: {path} (fused {ms['fused']:.3f} ms, split {ms['split']:.3f} ms)")
    return 0


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .models.quantized import QUANT_TYPES
    from .training.loop import EVAL_MAX_BATCHES
    from .training.resources import SMALL_MODEL_WIDTH

    p = argparse.ArgumentParser(prog="lora-kernels", description="LoRA fine-tuning on fused Triton kernels.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.ArgumentDefaultsHelpFormatter

    f = sub.add_parser("finetune", formatter_class=fmt, help="LoRA fine-tune a causal LM; writes a PEFT adapter",
                       description="LoRA fine-tune a causal language model on local data. Writes a PEFT-format "
                       "adapter (adapter_config.json, adapter_model.safetensors), metrics.jsonl, loss_curve.png and "
                       "checkpoints/ into --output-dir. Run under torchrun for DistributedDataParallel.")
    f.add_argument("--model", default=TINY, help="a local transformers causal-LM directory, or 'tiny' for the "
                   "built-in 2-layer Llama with a byte tokenizer (random weights, saved to OUTPUT_DIR/base_model)")
    f.add_argument("--data", default=None, help="training data: .jsonl with {'text'} or {'prompt','response'} lines "
                   "(loss on the response only), or plain text (documents split by blank lines); default: the "
                   "shipped demo set")
    f.add_argument("--adapter", action="append", default=None, metavar="NAME=FILE",
                   help="train several adapters at once, repeatable (instead of --data): adapter NAME on FILE, "
                   "saved to OUTPUT_DIR/NAME; each micro-batch holds --batch-size rows of every adapter and runs "
                   "the base once; each adapter holds out --eval-fraction of its own file")
    f.add_argument("--eval-data", default=None, help="evaluation data (same formats); default: hold out "
                   "--eval-fraction of --data")
    f.add_argument("--eval-fraction", type=_fraction, default=0.05, help="share of packed rows held out for eval")
    f.add_argument("--output-dir", default="out/finetune", help="where the adapter, metrics, plot and checkpoints go; "
                   "a folder holding a previous run needs --resume or --overwrite")
    f.add_argument("--overwrite", action="store_true", help="start a new run in an --output-dir that holds a "
                   "previous one, deleting its checkpoints, metrics, plot and adapter (and a tiny run's base_model)")
    f.add_argument("--max-steps", type=_positive_int, default=300, help="optimizer steps")
    f.add_argument("--r", type=_positive_int, default=8, help="LoRA rank")
    f.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    f.add_argument("--lora-dropout", type=_fraction, default=0.05, help="dropout on the adapter input, in [0, 1)")
    f.add_argument("--use-rslora", action="store_true", help="scaling = alpha / sqrt(r)")
    f.add_argument("--use-dora", action="store_true", help="DoRA (PEFT's use_dora): a learned magnitude per output "
                   "feature over the normalised W + s·B·A")
    f.add_argument("--target-modules", type=_target_modules, default="all-linear",
                   help="'all-linear', a comma list (q_proj,v_proj) or a regex matching full module names")
    f.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate (default {TINY_LR:g} for 'tiny', {DEFAULT_LR:g} otherwise)")
    f.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    f.add_argument("--warmup-steps", type=_nonneg_int, default=10, help="linear warmup before the cosine decay")
    f.add_argument("--batch-size", type=_positive_int, default=8, help="rows per micro-batch per process")
    f.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--seq-len", type=_seq_len, default=128, help="packed sequence length in tokens (>= 2; a "
                   "warning above the model's position limit, an error where positions are a learned table)")
    f.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    f.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 autocast on a GPU that has it, fp32 on CPU; fp16 uses a GradScaler")
    f.add_argument("--load-dtype", choices=["fp32", "bf16", "fp16", "auto"], default="fp32",
                   help="dtype of the frozen base weights when loading --model (auto: the checkpoint's own; with "
                   "--quantize: of the layers left unquantized); adapters are float32 either way")
    f.add_argument("--quantize", choices=QUANT_TYPES, default=None,
                   help="QLoRA: load the base's linear layers 4-bit (NF4 or FP4) through transformers + "
                   "bitsandbytes, computing in --precision's dtype; the adapters train on the fused 4-bit kernels")
    f.add_argument("--double-quant", action="store_true",
                   help="with --quantize: quantize the 4-bit scales too (bnb_4bit_use_double_quant)")
    f.add_argument("--eval-every", type=_nonneg_int, default=50, help="evaluate every N steps (0: at the end only)")
    f.add_argument("--eval-max-batches", type=_nonneg_int, default=EVAL_MAX_BATCHES,
                   help="batches per evaluation, the final one included (the same first rows each time; 0: the "
                   "whole eval set); the default keeps eval under ~10%% of the default run's time")
    f.add_argument("--save-every", type=_nonneg_int, default=100, help="checkpoint every N steps (0: at the end only)")
    f.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory; without a value, the latest in OUTPUT_DIR/checkpoints")
    f.add_argument("--seed", type=int, default=0, help="seed for the tiny model, LoRA init, data order, dropout")
    f.add_argument("--strategy", choices=["auto", "ddp", "fsdp", "none"], default="auto",
                   help="under torchrun: auto = DDP; fsdp = FSDP2 fully_shard per transformer block")
    f.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    f.add_argument("--threads", type=_nonneg_int, default=0, help="CPU intra-op threads (0: OMP_NUM_THREADS if "
                   f"set, else 1 for models narrower than {SMALL_MODEL_WIDTH}, else one per core)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge", formatter_class=fmt, help="merge an adapter into its base model",
                       description="Load a base model, apply an adapter (PEFT format) and save the merged model "
                       "with save_pretrained; the result loads with AutoModelForCausalLM alone.")
    m.add_argument("--model", required=True, help="the base model directory (for a 'tiny' run: OUTPUT_DIR/base_model)")
    m.add_argument("--adapter", required=True, help="the adapter directory (a finetune --output-dir or a PEFT save)")
    m.add_argument("--output-dir", required=True, help="where to write the merged model")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser("check", formatter_class=fmt, help="compare the kernels with the reference on this machine",
                       description="Run the fused forward and backward on small odd shapes and compare y, grad_x, "
                       "grad_A, grad_B with the float64 reference; then the same with a 4-bit (QLoRA) base: NF4 and "
                       "FP4, double quant on and off, two blocksizes, with and without dropout, on every backend with "
                       "4-bit kernels that runs here (needs bitsandbytes; the reference uses its dequantized W). "
                       "Without a GPU the Triton kernels run under Triton's interpreter (slow but real). Exit status 1 "
                       "if any error exceeds its tolerance.")
    c.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="LORA_KERNELS_BACKEND for the check (auto: Triton on GPU and under the interpreter; the "
                   "4-bit cases run on every backend with 4-bit kernels)")
    c.add_argument("--dtype", action="append", choices=DTYPES,
                   help="dtype to check (repeatable); default fp32+fp16 on CPU, plus bf16 on GPU")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", formatter_class=fmt, help="time base vs fused vs PEFT LoRA on this machine",
                       description="Forward+backward timing of nn.Linear, FusedLoraLinear and PEFT's LoRA Linear on "
                       "one shape (CUDA events, L2 flushed between repetitions, on a GPU); defaults are small on "
                       "CPU, LLM-sized on GPU.")
    b.add_argument("--tokens", type=_positive_int, default=None, help="rows of x (default 512 CPU, 8192 GPU)")
    b.add_argument("--in-features", type=_positive_int, default=None, help="default 512 CPU, 4096 GPU")
    b.add_argument("--out-features", type=_positive_int, default=None, help="default: in-features")
    b.add_argument("--r", type=_positive_int, default=16, help="LoRA rank")
    b.add_argument("--dropout", type=_fraction, default=0.1, help="LoRA dropout")
    b.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    b.add_argument("--device", default=None, help="default cuda if available, else cpu")
    b.add_argument("--min-time", type=_positive_float, default=0.5, help="about how many seconds each case is timed")
    b.set_defaults(func=cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
