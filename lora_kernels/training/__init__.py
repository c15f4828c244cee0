"""LoRA fine-tuning in a plain PyTorch loop.

    loop.py         TrainConfig, Trainer (step, evaluate, train), TrainResult, the LR schedule and the loss
    checkpoint.py   RNG states, checkpoint write/read, listing and retention
    safe_state.py   checkpoint state as JSON + safetensors (nothing unpickled: reading one runs no code)
    distributed.py  process group, DDP / FSDP2 wrapping, unwrap, gathering sharded parameters
    metrics.py      metrics.jsonl, the progress bar, the loss-curve plot
    interrupt.py    Ctrl-C: stop at a step boundary with a checkpoint (TrainingInterrupted)
    rundir.py       the output directory: writable, previous run refused or cleared, a merge target checked
    manifest.py     lora_kernels_run.json: what a run wrote (all --overwrite deletes) and its settings
    resume.py       --resume: the checkpoint and the run's recorded settings, checked before loading
    divergence.py   several non-finite steps in a row stop a run
    resources.py    the device a user names, CPU threads for a model's width
    multi.py        MultiAdapterTrainer: several adapters of one base in mixed batches, each on its own data
"""
from .distributed import init_distributed, trainable_state_dict, unwrap
from .interrupt import TrainingInterrupted
from .loop import EVAL_MAX_BATCHES, Trainer, TrainConfig, TrainResult, causal_lm_loss_sum, warmup_cosine
from .metrics import plot_loss_curve
from .multi import MultiAdapterTrainer

__all__ = ["EVAL_MAX_BATCHES", "MultiAdapterTrainer", "Trainer", "TrainConfig", "TrainResult", "TrainingInterrupted",
           "causal_lm_loss_sum", "init_distributed", "plot_loss_curve", "trainable_state_dict", "unwrap", "warmup_cosine"]
