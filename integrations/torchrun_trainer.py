"""transformers Trainer under torchrun: a fused model (apply_fused_lora, and a PEFT model through fuse_peft_model)
trained with DDP (and, on GPUs, FSDP2), adapter-only checkpoints that PEFT loads, resume_from_checkpoint=True
continuing exactly, the FSDP2 adapter equal to the DDP one.

Trainer launches the same way under `torchrun` and `accelerate launch`; the strategies run in one launch here,
2 CPU processes with gloo (nccl on GPUs). On CPU accelerate (1.16) does not apply FSDP (its fsdp_plugin is used
for multi-GPU runs only, and a CPU run would silently train under DDP), so FSDP2 runs where GPUs are:

    torchrun --standalone --nproc_per_node 2 integrations/torchrun_trainer.py [OUTPUT_DIR]

A tiny Llama built from a config (no download); apply_fused_lora gives it fused LoRA layers and a
save_pretrained that writes only PEFT's adapter files, so every checkpoint-N/ holds the adapter, not the model.
"""
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_kernels.integrations.transformers import apply_fused_lora

FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def base_model():
    torch.manual_seed(0)   # every rank, every run: the same base and initial adapter
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def fused_model(kind="apply_fused_lora"):
    if kind == "fuse_peft_model":   # a PEFT model whose LoRA layers run on the fused kernels
        from peft import LoraConfig, get_peft_model

        from lora_kernels.integrations.peft import fuse_peft_model

        model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        fuse_peft_model(model)   # in place
        return model
    return apply_fused_lora(base_model(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def dataset():
    rows = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in rows]


def train(output_dir, resume=False, kind="apply_fused_lora", **strategy):
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)   # each Trainer here sets up its own strategy
    PartialState._reset_state()
    args = TrainingArguments(output_dir=output_dir, max_steps=4, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, seed=0, report_to=[], disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(),   # on CPU, accelerate needs it to use gloo
                             **strategy)
    trainer = Trainer(model=fused_model(kind), args=args, train_dataset=dataset())
    assert args.parallel_mode.value == "distributed" and args.world_size == 2, (args.parallel_mode, args.world_size)
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(output_dir)   # the final adapter, gathered from the shards under FSDP2
    return trainer


def adapter(directory):
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def main(out):
    rank = dist.get_rank()
    strategies = [("ddp", {}), ("peft-ddp", {"kind": "fuse_peft_model"})]
    if torch.cuda.is_available():
        strategies.append(("fsdp2", FSDP2))
        strategies.append(("peft-fsdp2", dict(FSDP2, kind="fuse_peft_model")))
    elif rank == 0:   # without this note a CPU run with fsdp= would silently train under DDP
        print("FSDP2 through Trainer needs GPUs: accelerate applies an fsdp_plugin to multi-GPU runs only; on CPU "
              "it trains under DDP instead")
    for name, strategy in strategies:
        run = os.path.join(out, name)
        t = train(run, **strategy)
        losses = [e["loss"] for e in t.state.log_history if "loss" in e]
        sharded = any(hasattr(p, "full_tensor") for p in t.model.parameters())   # FSDP2 leaves DTensor shards
        if sharded != name.endswith("fsdp2"):
            sys.exit(f"{name}: the parameters are {'' if sharded else 'not '}sharded")
        if rank == 0:
            print(f"{name}: sharded parameters: {sharded}; losses {' '.join(f'{x:.4f}' for x in losses)}; "
                  "checkpoint-2 holds "
                  + ", ".join(sorted(f for f in os.listdir(os.path.join(run, "checkpoint-2")) if "adapter" in f)))
            shutil.copytree(run, run + "-resumed")   # as if killed after checkpoint-2: later files go
            shutil.rmtree(os.path.join(run + "-resumed", "checkpoint-4"))
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                os.remove(os.path.join(run + "-resumed", f))
        dist.barrier()
        train(run + "-resumed", resume=True, **strategy)
        if rank == 0:
            full, resumed = adapter(run), adapter(run + "-resumed")
            exact = full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
            print(f"{name}: resumed from checkpoint-2, equal to the uninterrupted run bit for bit: {exact}")
            if not exact:
                sys.exit(f"{name}: the resumed run did not end where the uninterrupted one did")
    if rank == 0:
        from peft import PeftModel

        ddp = adapter(os.path.join(out, "ddp"))
        if len(strategies) == 4:
            fsdp = adapter(os.path.join(out, "fsdp2"))
            diff = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
            print(f"DDP and FSDP2 adapters ({len(ddp)} tensors), max abs difference: {diff:.2e}")
            if ddp.keys() != fsdp.keys() or diff > 1e-4:
                sys.exit("DDP and FSDP2 trained different adapters")
        for name, _ in strategies:
            peft_model = PeftModel.from_pretrained(base_model(),
                                                   os.path.join(out, name))
            loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
            saved = adapter(os.path.join(out, name))
            if sorted(t.sum().item() for t in loaded.values()) != sorted(t.sum().item() for t in saved.values()):
                sys.exit(f"PEFT loaded other tensors than the {name} adapter holds")
            print(f"PEFT loaded the {name} adapter: {len(loaded)} LoRA tensors")
        print(f"OK: Trainer under {' and '.join(n for n, _ in strategies)} wrote adapter-only checkpoints "
              "that PEFT loads and resumed exactly")


if __name__ == "__main__":
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    chosen = [sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="torchrun_trainer_")]
    dist.broadcast_object_list(chosen)   # every rank writes to the folder rank 0 chose
    main(chosen[0])
    dist.destroy_process_group()
