"""The finetune subcommand's flags."""
from __future__ import annotations

from .common import (DEFAULT_LR, EVAL_MAX_BATCHES, QUANT_TYPES, SMALL_MODEL_WIDTH, TINY, TINY_LR, fraction,
                     name_list_arg, nonneg_int, positive_float, positive_int, seed_arg, seq_len_arg, target_modules_arg)
from .finetune import cmd_finetune


def add_parser(sub, fmt) -> None:
    """The finetune subcommand and its flags."""
    f = sub.add_parser("finetune", formatter_class=fmt, help="LoRA fine-tune a causal LM; writes a PEFT adapter",
                       description="LoRA fine-tune a causal language model on local data. Writes a PEFT-format "
                       "adapter (adapter_config.json, adapter_model.safetensors), metrics.jsonl, loss_curve.png and "
                       "checkpoints/ into --output-dir. Run under torchrun for DistributedDataParallel.")
    f.add_argument("--model", default=TINY, help="a local transformers causal-LM directory, or 'tiny' for the "
                   "built-in 2-layer Llama with a byte tokenizer (random weights, saved to OUTPUT_DIR/base_model), "
                   "or 'tiny-moe' for a built-in 2-layer Qwen3-MoE (8 experts, top-2) the same way")
    f.add_argument("--data", default=None, help="training data: .jsonl with {'text'} or {'prompt','response'} lines "
                   "(loss on the response only), or plain text (documents split by blank lines); default: the "
                   "shipped demo set")
    f.add_argument("--adapter", action="append", default=None, metavar="NAME=FILE",
                   help="train several adapters at once, repeatable (instead of --data): adapter NAME on FILE, "
                   "saved to OUTPUT_DIR/NAME; each micro-batch holds --batch-size rows of every adapter and runs "
                   "the base once; each adapter holds out --eval-fraction of its own file")
    f.add_argument("--eval-data", default=None, help="evaluation data (same formats); default: hold out "
                   "--eval-fraction of --data")
    f.add_argument("--eval-fraction", type=fraction, default=0.05, help="share of packed rows held out for eval")
    f.add_argument("--output-dir", default="out/finetune", help="where the adapter, metrics, plot and checkpoints go; "
                   "a folder holding a previous run needs --resume or --overwrite")
    f.add_argument("--overwrite", action="store_true", help="start a new run in an --output-dir that holds a "
                   "previous one, deleting its checkpoints, metrics, plot and adapter (and a tiny run's base_model)")
    f.add_argument("--max-steps", type=positive_int, default=300, help="optimizer steps")
    f.add_argument("--r", type=positive_int, default=8, help="LoRA rank")
    f.add_argument("--lora-alpha", type=positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    f.add_argument("--lora-dropout", type=fraction, default=0.05, help="dropout on the adapter input, in [0, 1)")
    f.add_argument("--use-rslora", action="store_true", help="scaling = alpha / sqrt(r)")
    f.add_argument("--use-dora", action="store_true", help="DoRA (PEFT's use_dora): a learned magnitude per output "
                   "feature over the normalised W + s·B·A")
    f.add_argument("--target-modules", type=target_modules_arg, default="all-linear",
                   help="'all-linear', a comma list (q_proj,v_proj) or a regex matching full module names")
    f.add_argument("--target-parameters", type=name_list_arg, default=None,
                   help="MoE experts: a comma list of 3-D expert weights to adapt, as PEFT's target_parameters "
                        "(mlp.experts.gate_up_proj,mlp.experts.down_proj)")
    f.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak learning rate (default {TINY_LR:g} for 'tiny', {DEFAULT_LR:g} otherwise)")
    f.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    f.add_argument("--warmup-steps", type=nonneg_int, default=None, help="linear warmup before the cosine decay "
                   "(default 10; a value >= --max-steps draws a warning)")
    f.add_argument("--batch-size", type=positive_int, default=8, help="rows per micro-batch per process")
    f.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--seq-len", type=seq_len_arg, default=128, help="packed sequence length in tokens (>= 2; a "
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
    f.add_argument("--eval-every", type=nonneg_int, default=50, help="evaluate every N steps (0: at the end only)")
    f.add_argument("--eval-max-batches", type=nonneg_int, default=EVAL_MAX_BATCHES,
                   help="batches per evaluation, the final one included (the same first rows each time; 0: the "
                   "whole eval set); the default keeps eval under ~10%% of the default run's time")
    f.add_argument("--save-every", type=nonneg_int, default=100, help="checkpoint every N steps (0: at the end only)")
    f.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory; without a value, the latest in OUTPUT_DIR/checkpoints")
    f.add_argument("--seed", type=seed_arg, default=0, help="seed for the tiny model, LoRA init, data order, dropout")
    f.add_argument("--strategy", choices=["auto", "ddp", "fsdp", "none"], default="auto",
                   help="under torchrun: auto = DDP; fsdp = FSDP2 fully_shard per transformer block")
    f.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    f.add_argument("--threads", type=nonneg_int, default=0, help="CPU intra-op threads (0: OMP_NUM_THREADS if "
                   f"set, else 1 for models narrower than {SMALL_MODEL_WIDTH}, else one per core)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)
