"""torchrun: fused LoRA under DistributedDataParallel and under FSDP2 (fully_shard), in your own training loop, then
FSDP2 over a 4-bit base (QLoRA that does not fit one GPU): an inject_lora-ed bitsandbytes NF4 model and a PEFT
QLoRA model (FP4) passed through fuse_peft_model.

The fused layers need nothing special: DDP all-reduces the adapter gradients; FSDP2 unshards each block's
parameters into plain tensors before its forward (the kernels see an ordinary weight, lora_A and lora_B) and
reduce-scatters the adapter gradients. For a 4-bit base, load it with bnb_4bit_quant_storage set to a float dtype
(here the compute dtype, float32): the packed 4-bit bytes are then a float tensor fully_shard shards like any other
frozen weight, and the fused 4-bit layers pair the all-gathered bytes with the quant state kept on the module.

Every rank trains on its own rows. The script trains a tiny Llama (built from a config, no download) under DDP and
under FSDP2, saves each adapter in PEFT's format and checks that both runs end with the same adapter; then each
4-bit model under FSDP2, checking that only adapter tensors get gradients and that rank 0, training the same model
in one process on both ranks' rows, ends with the same adapter. 2 CPU processes with gloo (nccl on GPUs):

    torchrun --standalone --nproc_per_node 2 integrations/torchrun_ddp_fsdp.py [OUTPUT_DIR]
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lora_kernels as lk

QUANT_TYPE = {"inject_lora": "nf4", "fuse_peft_model": "fp4"}   # the 4-bit runs, both with double quantization


def fused_model(device):
    torch.manual_seed(0)   # every rank builds the same model
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    return lk.inject_lora(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).to(device)


def quantized_model(base_dir, kind, device):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE[kind], bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_quant_storage=torch.float32)   # a float storage: what FSDP2 can shard
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, device_map=device)
    torch.manual_seed(0)   # the same initial adapter on every rank and in the one-process run
    if kind == "fuse_peft_model":
        from peft import LoraConfig, get_peft_model

        from lora_kernels.integrations.peft import fuse_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        fuse_peft_model(model)   # PEFT's lora.Linear4bit layers now run on the fused 4-bit kernels
        return model
    return lk.inject_lora(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def shard(model):
    """fully_shard each transformer block, then the root."""
    for block in model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers:
        fully_shard(block)
    fully_shard(model)


def train(model, rows, steps=6):
    """AdamW steps on rows; returns the losses and the names of the parameters that got a gradient."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)   # after wrapping
    losses, got_grad = [], set()
    for _ in range(steps):
        loss = model(rows, labels=rows).loss
        loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), got_grad


def mean_over_ranks(losses):
    dist.all_reduce(losses)
    return (losses / dist.get_world_size()).tolist()


def gathered(model):
    """The trained tensors by name, gathered from the shards (a collective under FSDP2: every rank calls it)."""
    return {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def ddp_and_fsdp2(out, rank, device):
    rows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(100 + rank)).to(device)
    model = fused_model(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    losses = mean_over_ranks(train(ddp, rows)[0])
    if rank == 0:
        print(f"DDP   loss (mean over ranks): {losses[0]:.3f} -> {losses[-1]:.3f}")
        lk.save_adapter(model, os.path.join(out, "ddp"))   # the model inside DDP: plain parameters

    model = fused_model(device)
    shard(model)
    losses = mean_over_ranks(train(model, rows)[0])
    # The parameters are now DTensor shards: gather the adapter's full tensors and hand them to the saver, by the
    # model's own parameter names.
    full = gathered(model)
    if rank == 0:
        print(f"FSDP2 loss (mean over ranks): {losses[0]:.3f} -> {losses[-1]:.3f}")
        lk.save_adapters(model, os.path.join(out, "fsdp2"), state_dict=full)

        ddp_file, fsdp_file = (load_file(os.path.join(out, d, "adapter_model.safetensors")) for d in ("ddp", "fsdp2"))
        diff = max((ddp_file[k] - fsdp_file[k]).abs().max().item() for k in ddp_file)
        print(f"DDP and FSDP2 adapters ({len(ddp_file)} tensors), max abs difference: {diff:.2e}")
        if ddp_file.keys() != fsdp_file.keys() or diff > 1e-4 or not losses[-1] < losses[0]:
            sys.exit("DDP and FSDP2 disagree, or the loss did not fall")


def fsdp2_4bit(out, rank, device):
    base_dir = os.path.join(out, "base")
    if rank == 0:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64)).save_pretrained(base_dir)
    dist.barrier()
    world = dist.get_world_size()
    rows = torch.randint(0, 64, (2 * world, 16), generator=torch.Generator().manual_seed(1)).to(device)
    mine = rows[2 * rank:2 * rank + 2]   # this rank's share of the global batch
    for kind, quant_type in QUANT_TYPE.items():
        model = quantized_model(base_dir, kind, device)
        shard(model)
        packed = [p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "q_proj.base_layer.weight"))]
        sharded = len(packed) == 2 and all(hasattr(p, "full_tensor") and p.dtype == torch.float32 for p in packed)
        got_grad = train(model, mine, steps=3)[1]
        ours = gathered(model)
        if rank == 0:
            only_adapters = bool(got_grad) and all("lora_" in n for n in got_grad)
            print(f"{kind}: packed {quant_type} weights sharded as float32 DTensors: {sharded}; "
                  f"{len(got_grad)} tensors got gradients, all of them adapter tensors: {only_adapters}")
            one = quantized_model(base_dir, kind, device)   # one process, both ranks' rows
            train(one, rows, steps=3)
            theirs = gathered(one)
            diff = max((ours[n] - theirs[n]).abs().max().item() for n in theirs)
            moved = all(ours[n].abs().max() > 0 for n in ours if "lora_B" in n)
            print(f"{kind}: 4-bit base, 2-rank FSDP2 vs one process on the same rows, {len(theirs)} adapter tensors, "
                  f"max abs difference: {diff:.2e}")
            if not (sharded and only_adapters and ours.keys() == theirs.keys() and diff <= 1e-4 and moved):
                sys.exit(f"{kind}: FSDP2 over the 4-bit base did not train like one process")
            if kind == "inject_lora":   # PEFT's files, from the gathered tensors (by the model's parameter names)
                lk.save_adapters(model, os.path.join(out, "fsdp2-nf4"), state_dict=ours)
        dist.barrier()


def main(out):
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    ddp_and_fsdp2(out, rank, device)
    fsdp2_4bit(out, rank, device)
    if rank == 0:
        print("OK: DDP and FSDP2 trained the same adapter; FSDP2 over the 4-bit bases trained only the adapters, "
              "as one process does")


if __name__ == "__main__":
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    chosen = [sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="torchrun_")]
    dist.broadcast_object_list(chosen)   # every rank writes to the folder rank 0 chose
    main(chosen[0])
    dist.destroy_process_group()
