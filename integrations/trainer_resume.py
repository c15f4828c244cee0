"""transformers Trainer: adapter-only checkpoints, a run killed mid-way, and resume_from_checkpoint=True.

apply_fused_lora gives a transformers model fused LoRA layers and a save_pretrained that writes only the adapter
(PEFT's files), so every checkpoint-N/ Trainer writes holds the adapter, optimizer, scheduler and RNG states, not
the model. A run is killed after step 3 (simulated by an exception); a fresh process would rebuild the model the
same way (here: with other initial adapter weights, which the checkpoint replaces) and call
train(resume_from_checkpoint=True). It continues from checkpoint-2 and ends exactly where an uninterrupted run
ends, dropout included. A tiny Llama built from a config (no download).

    python integrations/trainer_resume.py [OUTPUT_DIR]   # OUTPUT_DIR defaults to a new temporary directory
"""
import os
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from lora_kernels.integrations.transformers import apply_fused_lora


def fused_model(adapter_seed):
    torch.manual_seed(0)   # the same base weights every time
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    torch.manual_seed(adapter_seed)
    return apply_fused_lora(base, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def dataset():
    rows = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in rows]


def trainer(model, output_dir, *callbacks):
    args = TrainingArguments(output_dir=output_dir, max_steps=6, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, seed=0, report_to=[], disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks))


class KillAfter(TrainerCallback):
    """Stands in for a crash or a preempted job: the run dies after `step` (checkpoint-2 is on disk by then)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"killed after step {self.step}")


def losses(t):
    return " ".join(f"{e['loss']:.4f}" for e in t.state.log_history if "loss" in e)


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(out):
    full = fused_model(adapter_seed=0)
    t = trainer(full, os.path.join(out, "uninterrupted"))
    t.train()
    print("uninterrupted run, losses:", losses(t))

    run_dir = os.path.join(out, "run")
    try:
        trainer(fused_model(adapter_seed=0), run_dir, KillAfter(3)).train()
    except RuntimeError as err:
        print(f"first attempt: {err}")
    print("checkpoint-2 holds:", ", ".join(sorted(os.listdir(os.path.join(run_dir, "checkpoint-2")))))

    resumed = fused_model(adapter_seed=1)   # other initial adapters: the checkpoint must replace them
    t = trainer(resumed, run_dir)
    t.train(resume_from_checkpoint=True)
    print("resumed run, losses:      ", losses(t), "(steps 1-2 from checkpoint-2's trainer_state.json)")

    want, got = adapters(full), adapters(resumed)
    same = want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    print(f"resumed adapters equal the uninterrupted run's, bit for bit: {same}")
    if not same:
        sys.exit("the resumed run did not end where the uninterrupted one did")
    print("OK: killed, resumed from the adapter-only checkpoint, and ended exactly as the uninterrupted run")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trainer_resume_"))
