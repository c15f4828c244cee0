"""transformers Trainer under torchrun: a fused model (apply_fused_lora, and a PEFT model through fuse_peft_model)
and a mixed-adapter batch (two adapters, lk.batch_adapters) trained with DDP and with FSDP2, adapter files that
PEFT loads, resume_from_checkpoint=True continuing exactly, each FSDP2 adapter equal to the DDP one, and the mixed
run equal to one process reading the same global batch.

Trainer launches the same way under `torchrun` and `accelerate launch`; all runs share one launch here, 2 CPU
processes with gloo (nccl on GPUs):

    torchrun --standalone --nproc_per_node 2 integrations/torchrun_trainer.py [OUTPUT_DIR]

A tiny Llama built from a config (no download); apply_fused_lora gives it fused LoRA layers and a
save_pretrained that writes only PEFT's adapter files. FSDP2 is Trainer's own: TrainingArguments(fsdp=True,
fsdp_config={"version": 2, ...}), which accelerate applies with fully_shard per decoder layer and the root.
"""
import gc
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator)

import lora_kernels as lk
from lora_kernels.integrations.transformers import apply_fused_lora

FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
NAMES = ["default", "b"]   # the mixed runs: row i trains adapter NAMES[i % 2]


def fsdp_on_cpu():
    """CPU only; on GPUs nothing is patched. accelerate 1.16 turns an FSDP config on only for accelerator runs
    (AcceleratorState enables it for MULTI_GPU, MULTI_NPU, ..., not MULTI_CPU): on CPU, Trainer given fsdp= would
    train under DDP without saying so. This sets the distributed type accelerate sets on GPUs, so its own FSDP2 path
    runs over gloo: fsdp2_prepare_model (fully_shard), the gathered state dict Trainer saves, save_fsdp_model /
    load_fsdp_model for checkpoints. main() checks that the parameters are DTensor shards at every step."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP   # as accelerate does on GPUs

    AcceleratorState.__init__ = patched


def base_model():
    torch.manual_seed(0)   # every rank, every run: the same base and initial adapters
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def fused_model(kind):
    if kind == "fuse_peft_model":   # a PEFT model whose LoRA layers run on the fused kernels
        from peft import LoraConfig, get_peft_model

        from lora_kernels.integrations.peft import fuse_peft_model

        model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        fuse_peft_model(model)   # in place
        return model
    model = apply_fused_lora(base_model(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if kind == "mixed":   # a second adapter; save_pretrained writes it to <dir>/b, as PEFT does
        lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    return model


def dataset(kind):
    rows = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))
    if kind == "mixed":   # each row names its adapter
        return [{"input_ids": x, "labels": x, "adapter": NAMES[i % 2]} for i, x in enumerate(rows)]
    return [{"input_ids": x, "labels": x} for x in rows]


def collate(rows):
    batch = default_data_collator([{k: v for k, v in r.items() if k != "adapter"} for r in rows])
    batch["adapter"] = [r["adapter"] for r in rows]   # the default collator drops strings
    return batch


class ShardedSteps(TrainerCallback):
    """Records, at every optimizer step, whether all the model's parameters are DTensor shards (FSDP2's)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(all(hasattr(p, "full_tensor") for p in model.parameters()))


class MixedAdapterTrainer(Trainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        with lk.batch_adapters(model, inputs.pop("adapter")):
            return super().compute_loss(model, inputs, *args, **kwargs)


def train(output_dir, resume=False, kind="apply_fused_lora", batch=2, **strategy):
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)   # each Trainer here sets up its own strategy
    PartialState._reset_state()
    mixed = kind == "mixed"
    args = TrainingArguments(output_dir=output_dir, max_steps=4, save_steps=2, per_device_train_batch_size=batch,
                             learning_rate=1e-2, logging_steps=1, seed=0, report_to=[], disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(),   # on CPU, accelerate needs it to use gloo
                             # in order, so that each rank's 2 rows hold both adapters (under DDP an adapter
                             # without rows on one rank would have no gradient there)
                             train_sampling_strategy="sequential" if mixed else "random",
                             remove_unused_columns=not mixed,   # else Trainer drops the "adapter" column
                             **strategy)
    cls, extra = (MixedAdapterTrainer, {"data_collator": collate}) if mixed else (Trainer, {})
    trainer = cls(model=fused_model(kind), args=args, train_dataset=dataset(kind), callbacks=[ShardedSteps()],
                  **extra)
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(output_dir)   # the final adapters, gathered from the shards under FSDP2
    return trainer


def adapters(directory, kind):
    """Every adapter file of a run, by adapter: "default" at the root, "b" (mixed runs) in b/."""
    names = NAMES if kind == "mixed" else ["default"]
    return {n: load_file(os.path.join(directory, "" if n == "default" else n, "adapter_model.safetensors"))
            for n in names}


def max_diff(x, y):
    if x.keys() != y.keys() or any(x[n].keys() != y[n].keys() for n in x):
        return float("inf")
    return max((x[n][k] - y[n][k]).abs().max().item() for n in x for k in x[n])


def main(out):
    rank = dist.get_rank()
    runs = [("ddp", "apply_fused_lora", {}), ("peft-ddp", "fuse_peft_model", {}), ("mixed-ddp", "mixed", {}),
            ("fsdp2", "apply_fused_lora", FSDP2), ("peft-fsdp2", "fuse_peft_model", FSDP2),
            ("mixed-fsdp2", "mixed", FSDP2)]   # FSDP last: given an fsdp_plugin, accelerate's Accelerator sets
    # ACCELERATE_USE_FSDP=true in os.environ, which later Trainers in the same process would read as FSDP(1)
    if not torch.cuda.is_available():
        fsdp_on_cpu()
        # accelerate names a CPU rank's device "cpu:0"; transformers <= 5.17 resumes the optimizer with
        # torch.load(map_location=args.device), which cannot restore to "cpu:0" (5.18 passes "cpu" instead)
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    for name, kind, strategy in runs:
        run = os.path.join(out, name)
        t = train(run, kind=kind, **strategy)
        losses = [e["loss"] for e in t.state.log_history if "loss" in e]
        steps = next(c for c in t.callback_handler.callbacks if isinstance(c, ShardedSteps)).steps
        sharded = len(steps) == 4 and all(steps)   # at every step, as fully_shard leaves them
        if sharded != bool(strategy) or (not sharded and any(steps)):
            sys.exit(f"{name}: the parameters are {'' if sharded else 'not '}sharded (per step: {steps})")
        if rank == 0:
            ckpt = os.path.join(run, "checkpoint-2")
            print(f"{name}: sharded parameters: {sharded}; losses {' '.join(f'{x:.4f}' for x in losses)}; "
                  f"checkpoint-2 holds {', '.join(sorted(f for f in os.listdir(ckpt) if 'adapter' in f))}")
            if strategy:   # accelerate's own file for resuming an FSDP run: trainable tensors only for a PeftModel
                held = torch.load(os.path.join(ckpt, "pytorch_model_fsdp.bin"))
                print(f"{name}: checkpoint-2/pytorch_model_fsdp.bin holds {len(held)} tensors, the frozen base "
                      f"included: {any('lora' not in k for k in held)}")
            shutil.copytree(run, run + "-resumed")   # as if killed after checkpoint-2: later files go
            shutil.rmtree(os.path.join(run + "-resumed", "checkpoint-4"))
            for n in adapters(run, kind):
                folder = os.path.join(run + "-resumed", "" if n == "default" else n)
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    os.remove(os.path.join(folder, f))
        dist.barrier()
        train(run + "-resumed", resume=True, kind=kind, **strategy)
        if rank == 0:
            exact = max_diff(adapters(run, kind), adapters(run + "-resumed", kind)) == 0
            print(f"{name}: resumed from checkpoint-2, equal to the uninterrupted run bit for bit: {exact}")
            if not exact:
                sys.exit(f"{name}: the resumed run did not end where the uninterrupted one did")
        dist.barrier()
    if rank == 0:
        check(out, runs)


def check(out, runs):
    from peft import PeftModel

    for ddp, fsdp2, kind in (("ddp", "fsdp2", "apply_fused_lora"), ("peft-ddp", "peft-fsdp2", "fuse_peft_model"),
                             ("mixed-ddp", "mixed-fsdp2", "mixed")):
        diff = max_diff(adapters(os.path.join(out, ddp), kind), adapters(os.path.join(out, fsdp2), kind))
        print(f"{ddp} and {fsdp2} adapters, max abs difference: {diff:.2e}")
        if diff > 1e-4:   # fp32, gradients summed in another order
            sys.exit(f"{ddp} and {fsdp2} trained different adapters")
    one = one_process(os.path.join(out, "mixed-one-process"))
    for name in ("mixed-ddp", "mixed-fsdp2"):
        diff = max_diff(adapters(os.path.join(out, name), "mixed"), one)
        print(f"{name} vs one process on the same global batch, max abs difference: {diff:.2e}")
        if diff > 1e-4:
            sys.exit(f"{name} trained other adapters than one process on the same rows")
    for name, kind, _ in runs:
        peft_model = PeftModel.from_pretrained(base_model(), os.path.join(out, name))
        for n in NAMES[1:] if kind == "mixed" else []:
            peft_model.load_adapter(os.path.join(out, name, n), adapter_name=n)
        loaded = sorted(v.sum().item() for k, v in peft_model.state_dict().items() if "lora_" in k)
        saved = sorted(t.sum().item() for a in adapters(os.path.join(out, name), kind).values() for t in a.values())
        if loaded != saved:
            sys.exit(f"PEFT loaded other tensors than the {name} adapters hold")
        print(f"PEFT loaded the {name} adapter(s): {len(loaded)} LoRA tensors")
    print(f"OK: Trainer under {', '.join(n for n, _, _ in runs)} wrote adapter files PEFT loads and resumed "
          "exactly; FSDP2 equals DDP; the mixed batches equal one process")


def one_process(out):
    """The mixed run in this process alone, reading both ranks' rows (4 per step): the process group is gone and
    the launcher's variables (and accelerate's ACCELERATE_USE_FSDP) hidden, so accelerate sets up a plain
    one-process run."""
    dist.destroy_process_group()
    launcher = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                               "ACCELERATE_USE_FSDP") if k in os.environ}
    try:
        train(out, kind="mixed", batch=4)
    finally:
        os.environ.update(launcher)
    return adapters(out, "mixed")


if __name__ == "__main__":
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    chosen = [sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="torchrun_trainer_")]
    dist.broadcast_object_list(chosen)   # every rank writes to the folder rank 0 chose
    # Every Trainer.train() here ends in accelerate's gc.collect(), which walks all the objects the imports made
    # (~0.7 s a run on a CPU; this script runs 13): set them aside first. Only a matter of speed.
    gc.freeze()
    main(chosen[0])
    gc.unfreeze()
    if dist.is_initialized():   # rank 0 ended it for its one-process run
        dist.destroy_process_group()
