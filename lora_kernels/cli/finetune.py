"""`lora-kernels finetune`: a LoRA run (one adapter, or several with --adapter NAME=FILE), resumable."""
from __future__ import annotations

import os
import sys

from .common import (BASE_SUBDIR, BUILTIN, DEFAULT_LR, TINY_LR, TINY_MOE, WARMUP_STEPS, CLIError, CLIInterrupted,
                     load_model, rows_report, user_error)
from .multi import adapter_specs, adapters_report, load_adapter_data

def cmd_finetune(args) -> int:
    import torch

    from .. import save_adapter
    from ..data import DEMO_PATH, DataError, check_data_file, load_packed, split_eval
    from ..inject import find_targets
    from ..settings import check_environment
    from ..training import TrainConfig, Trainer, TrainingInterrupted, init_distributed
    from ..training.checkpoint import latest_checkpoint
    from ..training.multi import MultiAdapterTrainer, adapter_outputs
    from ..training.resources import resolve_device
    from ..training.resume import resume_target
    from ..training.rundir import check_writable, run_outputs, start_run

    # Every flag is checked before anything is written (a failed start leaves nothing a retry trips over).
    if args.resume is not None and args.overwrite:
        raise CLIError("--resume continues the run in --output-dir and --overwrite replaces it: pass one")
    _check_quantize_flags(args)
    user_error(check_environment)
    warmup_given = args.warmup_steps is not None
    if not warmup_given:
        args.warmup_steps = WARMUP_STEPS
    ours = not torch.distributed.is_initialized()   # a caller's process group outlives the run
    rank, world, device = init_distributed()
    if args.device:
        device = user_error(resolve_device, args.device, training=True)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    specs = adapter_specs(args)  # {name: data file} of --adapter flags; None for a one-adapter run
    if args.use_dora and specs:
        raise CLIError("--use-dora with several --adapter flags: mixed-adapter batches with DoRA are not "
                       "supported yet")
    data_path = args.data or DEMO_PATH
    for flag, path in (("--data", None if specs else data_path), ("--eval-data", args.eval_data)):
        if path is not None:
            user_error(check_data_file, flag, path)
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        raise CLIError(f"--resume {args.resume!r}: no such checkpoint directory")
    user_error(check_writable, args.output_dir)
    base_dir = os.path.join(args.output_dir, BASE_SUBDIR) if args.model in BUILTIN else os.path.abspath(args.model)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    quant = _quantization(args, precision)
    lr = args.lr if args.lr is not None else (TINY_LR if args.model in BUILTIN else DEFAULT_LR)
    try:
        tcfg = TrainConfig(output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, lr=lr, weight_decay=args.weight_decay,
                           warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, precision=precision,
                           eval_every=args.eval_every, eval_batches=args.eval_max_batches,
                           save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
                           strategy=args.strategy, overwrite=args.overwrite)
    except ValueError as err:  # e.g. a negative --weight-decay ("weight_decay must be ...")
        raise CLIError(f"invalid option: {err}") from None
    cfg = lora_config(args)
    settings = run_settings(args, lr, precision, specs)
    outputs = run_outputs(adapter_outputs(specs or ()))
    resume = None
    if args.resume is None:  # a previous run is refused now, not after loading the model and the data
        user_error(start_run, args.output_dir, args.overwrite, outputs, clear=False)
    else:  # the run's state and settings are checked before any model is loaded
        resume, finished_at = user_error(resume_target, args.output_dir, args.resume, settings, say, write=main)
        if finished_at is not None and finished_at >= args.max_steps:
            say(f"the run in {args.output_dir} is finished: its checkpoint is at step {finished_at} and "
                f"--max-steps is {args.max_steps}; nothing to train (raise --max-steps to continue it)")
            return 0

    torch.manual_seed(args.seed)  # LoRA init: the same on every rank (DDP also broadcasts rank 0's)
    model, tok = _base_model(args, base_dir, quant, device, new_tiny=resume is None, main=main)
    _set_threads(model, device, args)
    new_tiny = args.model in BUILTIN and resume is None
    _check_each_target(model, cfg)
    if new_tiny:  # injected after its base is saved (a model with adapters saves adapter files only)
        user_error(find_targets, model, cfg)
    else:
        _inject(model, cfg, specs)
    try:
        if specs:
            train_ds, eval_ds = load_adapter_data(specs, tok, args, say, world)
        else:
            train_ds = load_packed(data_path, tok, args.seq_len)
            eval_ds = None
            if args.eval_data:
                eval_ds = load_packed(args.eval_data, tok, args.seq_len)
            elif args.eval_fraction > 0:
                train_ds, eval_ds = split_eval(train_ds, args.eval_fraction, seed=args.seed, in_place=True)
            say(f"data: {data_path}: {rows_report(train_ds, eval_ds, args, world)}")
    except DataError as err:
        raise CLIError(str(err)) from None

    if resume is None:  # the first write: a previous run is refused (or, on --overwrite, its files deleted)
        notice = user_error(start_run, args.output_dir, args.overwrite, outputs, clear=main, settings=settings)
        if notice:
            say(notice)
        if new_tiny:
            model, tok = _save_tiny_base(model, tok, base_dir, quant, device, main, world)
            _inject(model, cfg, specs)
    _report_model(model, args, device, precision, quant, world, say)
    if warmup_given and args.warmup_steps >= args.max_steps and main:
        print(f"lora-kernels finetune: warning: --warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}: "
              "the learning rate never reaches its peak --lr", file=sys.stderr)

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
        result = trainer.train(resume_from=resume)
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
            say(adapters_report(specs, result, args.output_dir))
        else:
            say(f"adapter (PEFT format): {args.output_dir}/adapter_config.json, adapter_model.safetensors")
        say(f"metrics: {result.metrics_path}" + (f"; loss curve: {result.plot_path}" if result.plot_path else ""))
        say(_how_to_load(base_dir, os.path.join(args.output_dir, next(iter(specs))) if specs else args.output_dir,
                         quant, peft_loads=not (args.target_parameters and args.lora_dropout)))
    if ours and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def lora_config(args):
    """The run's LoraConfig, every entry of --target-modules checked for a bounded-time pattern."""
    from .. import LoraConfig

    return user_error(LoraConfig, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules, use_rslora=args.use_rslora, use_dora=args.use_dora,
                      target_parameters=args.target_parameters)


def run_settings(args, lr: float, precision: str, specs) -> dict:
    """The flags that define a run, as its manifest records them (compared on --resume)."""
    def where(path):
        return None if path is None else os.path.abspath(path)

    tm = args.target_modules
    # The shipped demo set is recorded by name: its path changes when the package is reinstalled elsewhere.
    data = None if specs else (where(args.data) if args.data else "demo")
    return {"--model": args.model if args.model in BUILTIN else where(args.model), "--data": data,
            "--adapter": {n: where(p) for n, p in specs.items()} if specs else None,
            "--eval-data": where(args.eval_data), "--eval-fraction": args.eval_fraction, "--seq-len": args.seq_len,
            "--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--r": args.r,
            "--lora-alpha": args.lora_alpha, "--lora-dropout": args.lora_dropout, "--use-rslora": args.use_rslora,
            "--use-dora": args.use_dora,
            "--target-modules": tm if isinstance(tm, str) else list(tm),
            "--target-parameters": args.target_parameters, "--lr": lr,
            "--weight-decay": args.weight_decay, "--warmup-steps": args.warmup_steps,
            "--max-grad-norm": args.max_grad_norm, "--precision": precision, "--load-dtype": args.load_dtype,
            "--quantize": args.quantize, "--double-quant": args.double_quant, "--seed": args.seed,
            "--max-steps": args.max_steps, "--eval-every": args.eval_every,
            "--eval-max-batches": args.eval_max_batches, "--save-every": args.save_every}


def _base_model(args, base_dir: str, quant, device, new_tiny: bool, main: bool):
    """(model, tokenizer): --model loaded, a resumed tiny run's own base, or a new tiny base (not yet saved)."""
    import torch

    from ..models import build_tiny_model, check_seq_len

    if args.model not in BUILTIN:
        dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.load_dtype]
        model, tok = load_model(args.model, dtype=dtype, quant=quant, device=device)
    elif not new_tiny and os.path.isfile(os.path.join(base_dir, "config.json")):
        # the run's own base, whatever --seed says now
        model, tok = load_model(base_dir, dtype=torch.float32, quant=quant, device=device)
    else:
        model, tok = build_tiny_model(args.seq_len, seed=args.seed, moe=args.model == TINY_MOE)
    warning = user_error(check_seq_len, model, args.seq_len)
    if warning and main:
        print(f"lora-kernels finetune: warning: {warning}", file=sys.stderr)
    return model, tok


def _save_tiny_base(model, tok, base_dir: str, quant, device, main: bool, world: int):
    """Save a new tiny run's random base (merge and PEFT need it), recorded in the run's manifest; with --quantize
    load it back 4-bit through transformers' loader, as a user loads the saved base."""
    import torch

    from ..models import save_tiny_base
    from ..training.distributed import barrier
    from ..training.manifest import write_manifest

    if main:
        save_tiny_base(model, tok, base_dir)
        output_dir = os.path.dirname(base_dir)
        write_manifest(output_dir, [os.path.join(BASE_SUBDIR, n) for n in sorted(os.listdir(base_dir))])
    if quant is not None:
        barrier(world)
        model, tok = load_model(base_dir, dtype=torch.float32, quant=quant, device=device)
    return model, tok


def _check_each_target(model, cfg) -> None:
    """PEFT's rule that target_modules must match something, applied to each entry of a --target-modules list:
    a misspelt entry beside a correct one would otherwise train fewer layers than asked, silently."""
    import copy

    from ..inject import find_targets

    if not isinstance(cfg.target_modules, list) or len(cfg.target_modules) < 2:
        return
    for entry in cfg.target_modules:
        one = copy.copy(cfg)
        one.target_modules = [entry]
        try:
            find_targets(model, one)
        except ValueError as err:
            raise CLIError(f"--target-modules entry {entry!r} matches no module ({str(err).split('; ', 1)[-1]})") \
                from None


def _inject(model, cfg, specs) -> None:
    from .. import inject_lora
    from ..layers import DEFAULT_ADAPTER

    for name in specs or [DEFAULT_ADAPTER]:
        user_error(inject_lora, model, cfg, adapter_name=name)


def _set_threads(model, device, args) -> None:
    import torch

    from ..training.resources import choose_threads, model_width

    threads = choose_threads(model_width(model), args.threads) if device.type == "cpu" else None
    if threads:
        torch.set_num_threads(threads)


def _report_model(model, args, device, precision: str, quant, world: int, say) -> None:
    import torch

    from .. import trainable_parameters

    trainable, total = trainable_parameters(model)
    n = torch.get_num_threads()
    where = f"device {device}" + (f" ({n} intra-op thread{'s' if n > 1 else ''})" if device.type == "cpu" else "")
    say(f"model: {args.model} ({total / 1e6:.2f}M parameters, {trainable / 1e3:.1f}K trainable = "
        f"{100 * trainable / total:.2f}%), {where}, precision {precision}, "
        + (f"base {quant.describe()}, " if quant else "") + f"{world} process(es)")


def _check_quantize_flags(args) -> None:
    """--quantize's companions and conflicts, before anything is loaded or written."""
    from ..models import require_bitsandbytes

    if args.double_quant and not args.quantize:
        raise CLIError("--double-quant quantizes the 4-bit base's scales: it needs --quantize nf4|fp4")
    if args.quantize:
        user_error(require_bitsandbytes)


def _quantization(args, precision: str):
    """The 4-bit settings of the run (None without --quantize): bnb computes in the run's precision."""
    import torch

    from ..models import Quantization

    if not args.quantize:
        return None
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # FSDP2 shards the packed 4-bit bytes as a tensor of the storage dtype: a float one, as bnb provides for it.
    storage = compute if args.strategy == "fsdp" else None
    return Quantization(args.quantize, args.double_quant, compute, storage)


def _how_to_load(base_dir: str, adapter_dir: str, quant=None, peft_loads: bool = True) -> str:
    merge = f"merge it:  lora-kernels merge --model {base_dir} --adapter {adapter_dir} --output-dir {adapter_dir}/merged"
    if not peft_loads:  # PEFT's ParamWrapper raises for lora_dropout on target_parameters
        return ("PEFT cannot load it (it refuses lora_dropout on target_parameters); load it with lora_kernels:\n"
                f"    lk.load_adapter(AutoModelForCausalLM.from_pretrained({base_dir!r}), {adapter_dir!r})\n" + merge)
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
        f"{adapter_dir!r})\n" + merge)

