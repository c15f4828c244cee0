"""Several processes: the process group, DDP / FSDP2 wrapping, and gathering sharded parameters.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU).
For models that do not fit one GPU, strategy "fsdp" shards each transformer block with FSDP2's fully_shard.
Every function here is safe in a single process, where the collectives are no-ops.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("auto", "ddp", "fsdp", "none")


def init_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world_size, device). Initializes the process group under torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def sum_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """In place: t summed over all ranks."""
    if world > 1:
        dist.all_reduce(t)
    return t


def loss_denominators(counts, world: int, device) -> list:
    """Per-rank loss denominators from this rank's loss-token counts: each global count over world.

    DDP and FSDP2 average the ranks' gradients, so a rank dividing its loss sum by (global tokens / world) makes
    the averaged gradient that of the global batch's token-weighted mean, whatever each rank's share of tokens
    (packing masks document starts, prompts are masked: the shares differ). One all-reduce of a few numbers.
    """
    t = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=device)
    sum_over_ranks(t, world)
    return [max(c, 1.0) / world for c in t.tolist()]   # no loss token anywhere: zero gradient, not NaN


def resolve_strategy(strategy: str, world: int) -> str:
    """One of STRATEGIES but "auto", which means DDP when there are several processes."""
    if strategy == "auto":
        return "ddp" if world > 1 else "none"
    if strategy != "none" and world == 1 and not dist.is_initialized():
        raise ValueError(f"strategy={strategy!r} needs torchrun (WORLD_SIZE > 1)")
    return strategy


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The model as the strategy ("ddp", "fsdp" or "none", from resolve_strategy) trains it."""
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        return apply_fsdp2(model)
    return model


def apply_fsdp2(model: nn.Module) -> nn.Module:
    """Shard every transformer block, then the root, with FSDP2 (torch.distributed.fsdp.fully_shard).

    FusedLoraLinear needs nothing special: fully_shard unshards a block's parameters into plain tensors
    before its forward, so the fused kernels see ordinary (unsharded) weight, lora_A and lora_B, and the
    adapter gradients are reduce-scattered back into the DTensor shards like any other gradient.
    """
    from torch.distributed.fsdp import fully_shard

    for block in _transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _transformer_blocks(model: nn.Module) -> List[nn.Module]:
    # HF decoders keep their blocks in an nn.ModuleList (model.model.layers, transformer.h, ...); the
    # largest ModuleList is the block stack.
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / accelerate / DeepSpeed wrappers, which all hold it in
    `.module` (transformers' unwrap_model follows the same convention). FSDP2 does not wrap."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP2-sharded) DTensor; collective for a DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(params) -> bool:
    return any(hasattr(p, "full_tensor") for p in params)


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """name -> detached CPU copy of every parameter that requires grad (gathered under FSDP2: every rank calls it)."""
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the trainable parameters; under FSDP2 each rank keeps its own shard."""
    for n, p in unwrap(model).named_parameters():
        if p.requires_grad:
            src = tensors[n].to(p.dtype)
            if hasattr(p, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
            p.copy_(src)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer state, gathered into full tensors on the CPU under FSDP2 (collective there)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        optimizer.load_state_dict(state)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module, is_main: bool) -> Iterator[nn.Module]:
    """The unwrapped model with full trainable tensors in place of FSDP2 shards (on rank 0) for the block.

    Every rank must enter it (the gather is collective); code that reads the model (a save) runs on
    rank 0 only. Without sharding it yields the unwrapped model unchanged.
    """
    model = unwrap(model)
    if not is_sharded(model.parameters()):
        yield model
        return
    full = trainable_state_dict(model)
    swapped = []
    if is_main:
        for name, p in model.named_parameters():
            if p.requires_grad:
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                swapped.append((owner, attr, owner._parameters[attr]))
                owner._parameters[attr] = nn.Parameter(full[name], requires_grad=True)
    try:
        yield model
    finally:
        for owner, attr, param in swapped:
            owner._parameters[attr] = param
