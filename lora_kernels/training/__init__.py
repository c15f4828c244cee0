"""LoRA fine-tuning in a plain PyTorch loop.

    loop.py         TrainConfig, Trainer (step, evaluate, train), TrainResult, the LR schedule and the loss
    checkpoint.py   RNG states, checkpoint write/read, listing and retention
    distributed.py  process group, DDP / FSDP2 wrapping, unwrap, gathering sharded parameters
    metrics.py      metrics.jsonl, the progress bar, the loss-curve plot
"""
from .distributed import init_distributed, trainable_state_dict, unwrap
from .loop import Trainer, TrainConfig, TrainResult, causal_lm_loss_sum, warmup_cosine
from .metrics import plot_loss_curve

__all__ = ["Trainer", "TrainConfig", "TrainResult", "causal_lm_loss_sum", "init_distributed", "plot_loss_curve",
           "trainable_state_dict", "unwrap", "warmup_cosine"]
