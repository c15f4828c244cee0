"""Run under torchrun by test_scaleout.py: the CLI's several-adapter run under DDP and FSDP2 and a QLoRA run under
FSDP2, each then resumed from its step-2 checkpoint, all in one launch (each torchrun start costs ~10 s of imports).

    torchrun --standalone --nproc_per_node 2 tests/multi_rank_runs.py ROOT PROSE_FILE QA_FILE

Writes ROOT/<run>/ (ddp, fsdp, fsdp-nf4) and ROOT/<run>-resumed/ (its copy resumed at step 2), and each rank's
final adapter tensors to ROOT/<run>/final<RANK>.pt, for the test to compare.
"""
import os
import shutil
import sys

import torch
import torch.distributed as dist

from lora_kernels.cli import main
from lora_kernels.training import trainable_state_dict
from lora_kernels.training import Trainer

FINAL = {}

# Shared by the test's one-process run (which reads twice these rows per adapter in one micro-batch).
FLAGS = ["--max-steps", "4", "--seq-len", "32", "--eval-every", "2", "--save-every", "2", "--lora-dropout", "0",
         "--warmup-steps", "0", "--no-progress"]
BATCH = 2   # rows of each adapter per rank per micro-batch


def finetune(out, prose, qa, strategy, *extra, quantized=False):
    """Both adapters; quantized: one adapter on prose over an NF4 base (a 4-bit layer holds one adapter)."""
    data = ["--data", str(prose), "--quantize", "nf4"] if quantized else ["--adapter", f"prose={prose}",
                                                                           "--adapter", f"qa={qa}"]
    return main(["finetune", "--output-dir", out, *data, "--strategy", strategy, "--batch-size", str(BATCH),
                 *FLAGS, *extra])


def record_final_tensors():
    """Keep each rank's own copy of the adapters a run ends with (what DDP or FSDP2 left on that rank)."""
    real = Trainer.train

    def train(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        FINAL["tensors"] = trainable_state_dict(self.model)   # gathered under FSDP2: every rank calls it
        return result

    Trainer.train = train   # MultiAdapterTrainer's too


def trained(out, prose, qa, strategy, *extra, quantized=False):
    assert finetune(out, prose, qa, strategy, *extra, quantized=quantized) == 0
    torch.save(FINAL.pop("tensors"), os.path.join(out, f"final{os.environ['RANK']}.pt"))


def run(root, prose, qa, strategy, quantized=False):
    out = os.path.join(root, strategy + ("-nf4" if quantized else ""))
    trained(out, prose, qa, strategy, quantized=quantized)
    resumed = out + "-resumed"
    if dist.get_rank() == 0:
        shutil.copytree(out, resumed)   # then what the run wrote after step 2 goes
        shutil.rmtree(os.path.join(resumed, "checkpoints", "step-0000004"))
        for name in ("adapter_model.safetensors", "adapter_config.json") if quantized else ("prose", "qa"):
            (shutil.rmtree if not quantized else os.remove)(os.path.join(resumed, name))
    dist.barrier()
    trained(resumed, prose, qa, strategy, "--resume", quantized=quantized)


if __name__ == "__main__":
    root, prose, qa = sys.argv[1:4]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")   # finetune runs in it and leaves it up (it ends only a group it started)
    record_final_tensors()
    for strategy in ("ddp", "fsdp"):
        run(root, prose, qa, strategy)
    run(root, prose, qa, "fsdp", quantized=True)
    dist.destroy_process_group()
