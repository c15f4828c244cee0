"""A plain-PyTorch LoRA training loop: no Trainer subclass, nothing hidden.

What a step does, in order:
  1. fetch grad_accum micro-batches, count the tokens that carry loss over all of them
  2. forward/backward each under autocast (bf16, or fp16 with a GradScaler); the loss is a token-weighted
     sum divided by the step's loss-token count, so accumulation equals one big batch exactly
  3. clip the gradient norm (logged every step); a non-finite norm skips the update and is counted
  4. AdamW over the trainable parameters only, then the warmup + cosine schedule
  5. log a JSONL record, evaluate (loss, perplexity) and checkpoint when due

A checkpoint holds the trainable tensors, optimizer, scheduler, scaler, step, data cursor and every
RNG state (per rank), so a resumed run continues bit-for-bit on CPU: dropout seeds come from torch's
RNG and the data order is a pure function of (seed, epoch).

Distributed: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on GPU) and every rank reads its own slice of each epoch's permutation. For models that do
not fit one GPU, strategy="fsdp" shards each transformer block with FSDP2's fully_shard.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .data.loader import IGNORE_INDEX, PackedDataset

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("auto", "ddp", "fsdp", "none")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    output_dir: str
    max_steps: int = 200
    batch_size: int = 8              # micro-batch rows per process
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0       # 0 disables clipping (the norm is still computed and logged)
    precision: str = "fp32"
    eval_every: int = 50             # 0: only at the end
    eval_batches: int = 0            # 0: the whole eval set
    save_every: int = 0              # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    progress: bool = True
    plot: bool = True
    strategy: str = "auto"           # auto: DDP when WORLD_SIZE > 1

    def __post_init__(self):
        ints = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "eval_every": 0,
                "eval_batches": 0, "save_every": 0, "keep_checkpoints": 1, "log_every": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    step: int
    loss: float
    eval_loss: Optional[float]
    skipped_steps: int
    seconds: float
    metrics_path: str
    plot_path: Optional[str]
    history: List[dict] = field(default_factory=list)


# -- schedule ------------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at `step` (0-based): linear warmup to 1, then cosine down to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- distributed ---------------------------------------------------------------------------------
def init_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world_size, device). Initializes the process group under torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def apply_fsdp2(model: nn.Module) -> nn.Module:
    """Shard every transformer block, then the root, with FSDP2 (torch.distributed.fsdp.fully_shard).

    FusedLoraLinear needs nothing special: fully_shard unshards a block's parameters into plain tensors
    before its forward, so the fused kernels see ordinary (unsharded) weight, lora_A and lora_B, and the
    adapter gradients are reduce-scattered back into the DTensor shards like any other gradient.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = _transformer_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _transformer_blocks(model: nn.Module) -> List[nn.Module]:
    # HF decoders keep their blocks in an nn.ModuleList (model.model.layers, transformer.h, ...); the
    # largest ModuleList is the block stack.
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP2-sharded) DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """name -> detached CPU copy of every parameter that requires grad (gathered under FSDP2)."""
    return {n: _full(p.detach()).cpu().clone() for n, p in _unwrap(model).named_parameters() if p.requires_grad}


# -- loss ----------------------------------------------------------------------------------------
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    core = _unwrap(model)
    if hasattr(core, "config") and hasattr(core.config, "use_cache"):
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (float32) over positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _n_loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# -- RNG -----------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- data order ----------------------------------------------------------------------------------
class ShardedBatches:
    """Micro-batches for one rank: each epoch is a permutation drawn from (seed, epoch), sliced per rank.

    The cursor (epoch, pos) is all the state there is, so resuming restores the order exactly without
    touching any global RNG.
    """

    def __init__(self, ds: PackedDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        per_rank = len(ds) // world
        if per_rank == 0:
            raise ValueError(f"the training set has {len(ds)} rows, fewer than the {world} processes; "
                             "use more data or a shorter --seq-len")
        self.ds, self.bs, self.seed, self.rank, self.world = ds, batch_size, seed, rank, world
        self.per_rank = per_rank
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(len(self.ds), generator=g)[: self.per_rank * self.world]
        return perm[self.rank::self.world]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.pos >= self.per_rank:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.pos:self.pos + self.bs]
        self.pos += len(idx)
        return self.ds.input_ids[idx], self.ds.labels[idx]


# -- the trainer ---------------------------------------------------------------------------------
class Trainer:
    """Train the parameters of `model` that require grad on a PackedDataset.

    model: a causal LM returning logits (or an object with .logits) for input_ids; set requires_grad on
    what should train (inject_lora does this). save_adapter: called as save_adapter(model, directory) on
    rank 0 with the unwrapped model, for the final adapter and each checkpoint (e.g. lk.save_adapter).
    """

    def __init__(self, model: nn.Module, train_data: PackedDataset, config: TrainConfig,
                 eval_data: Optional[PackedDataset] = None,
                 save_adapter: Optional[Callable[[nn.Module, str], None]] = None,
                 device: Optional[torch.device] = None):
        self.cfg = config
        self.rank, self.world, default_device = init_distributed()
        self.device = torch.device(device) if device is not None else default_device
        self.is_main = self.rank == 0
        self.save_adapter_fn = save_adapter
        if config.strategy != "fsdp":
            model.to(self.device)
        # FSDP2: fully_shard moves each block to the mesh's device as it shards it, so the whole model never
        # has to fit on one GPU at once.
        self.model = self._wrap(model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train "
                             "(inject LoRA first, e.g. lora_kernels.inject_lora)")
        self.param_names = [n for n, p in _unwrap(self.model).named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.max_steps, config.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.batches = ShardedBatches(train_data, config.batch_size, config.seed, self.rank, self.world)
        self.eval_data = eval_data
        self.step = 0
        self.skipped = 0
        self.tokens_seen = 0
        os.makedirs(config.output_dir, exist_ok=True)
        self.metrics_path = os.path.join(config.output_dir, METRICS_FILE)

    def _wrap(self, model: nn.Module) -> nn.Module:
        strategy = self.cfg.strategy
        if strategy == "auto":
            strategy = "ddp" if self.world > 1 else "none"
        if strategy != "none" and self.world == 1 and not dist.is_initialized():
            raise ValueError(f"strategy={strategy!r} needs torchrun (WORLD_SIZE > 1)")
        if strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if strategy == "fsdp":
            return apply_fsdp2(model)
        return model

    # -- one step --------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        micro = [self.batches.next() for _ in range(cfg.grad_accum)]
        n_tok = sum(_n_loss_tokens(lab) for _, lab in micro)
        denom = max(n_tok, 1)  # a step with no loss token contributes zero gradient, not NaN
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # one host sync per step, not per micro
        for i, (ids, labels) in enumerate(micro):
            ids, labels = ids.to(self.device), labels.to(self.device)
            last = i == len(micro) - 1
            sync = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else _nullcontext()
            with sync:
                with self._autocast():
                    logits = _logits(self.model, ids)
                loss = causal_lm_loss_sum(logits, labels) / denom
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(self.params, clip)))
        finite = math.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself when the unscaled grads hold inf/NaN
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if not finite:
            self.skipped += 1
        tokens = sum(ids.numel() for ids, _ in micro) * self.world
        self.tokens_seen += tokens
        return {"loss": self._mean_over_ranks(float(loss_sum)), "lr": lr, "grad_norm": grad_norm,
                "skipped": not finite, "tokens": tokens}

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
        """Token-weighted mean loss and perplexity on the eval set (each rank takes a slice; summed)."""
        if self.eval_data is None:
            return None
        self.model.eval()
        ds, bs = self.eval_data, self.cfg.batch_size
        rows = list(range(self.rank, len(ds), self.world))
        if self.cfg.eval_batches:
            rows = rows[: self.cfg.eval_batches * bs]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(rows), bs):
            idx = torch.tensor(rows[i:i + bs])
            ids, labels = ds.input_ids[idx].to(self.device), ds.labels[idx].to(self.device)
            with self._autocast():
                logits = _logits(self.model, ids)
            total[0] += float(causal_lm_loss_sum(logits, labels))
            total[1] += _n_loss_tokens(labels)
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        loss = float(total[0] / total[1].clamp(min=1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.cfg.output_dir, CHECKPOINT_DIR, f"step-{step:07d}")

    def save_checkpoint(self) -> str:
        path = self.checkpoint_dir(self.step)
        tmp = path + ".tmp"
        trainable = trainable_state_dict(self.model)  # collective under FSDP2: every rank calls it
        optim = self._optimizer_state()
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            torch.save(trainable, os.path.join(tmp, "trainable.pt"))
            torch.save({"optimizer": optim, "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "step": self.step, "skipped": self.skipped,
                        "tokens_seen": self.tokens_seen, "world_size": self.world,
                        "config": asdict(self.cfg)}, os.path.join(tmp, "trainer_state.pt"))
        self._barrier()
        self._save_adapter(os.path.join(tmp, "adapter"))
        # Each rank's own RNG and data cursor: ranks draw different dropout seeds and read different rows.
        torch.save({"rng": get_rng_state(), "data": self.batches.state()}, os.path.join(tmp, f"rank{self.rank}.pt"))
        self._barrier()
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)  # a checkpoint is either complete or absent
            self._prune_checkpoints()
        self._barrier()
        return path

    def _optimizer_state(self):
        if self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state) -> None:
        if self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.model, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            self.optimizer.load_state_dict(state)

    def _prune_checkpoints(self) -> None:
        root = os.path.join(self.cfg.output_dir, CHECKPOINT_DIR)
        done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
        for d in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything save_checkpoint wrote; the next step is the one after the checkpoint's."""
        state_file = os.path.join(path, "trainer_state.pt")
        if not os.path.isfile(state_file):
            raise ValueError(f"resume: {path!r} is not a checkpoint (no trainer_state.pt)")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state["world_size"] != self.world:
            raise ValueError(f"resume: checkpoint {path!r} was written by {state['world_size']} processes, "
                             f"this run has {self.world}")
        trainable = torch.load(os.path.join(path, "trainable.pt"), map_location="cpu")
        if sorted(trainable) != sorted(self.param_names):
            missing = sorted(set(self.param_names) - set(trainable))
            extra = sorted(set(trainable) - set(self.param_names))
            raise ValueError(f"resume: checkpoint {path!r} does not match the model's trainable parameters "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in _unwrap(self.model).named_parameters():
                if p.requires_grad:
                    src = trainable[n].to(p.dtype)
                    if hasattr(p, "full_tensor"):  # FSDP2: copy our shard of the full tensor
                        from torch.distributed.tensor import distribute_tensor
                        src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
                    p.copy_(src)
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped, self.tokens_seen = state["step"], state["skipped"], state["tokens_seen"]
        mine = torch.load(os.path.join(path, f"rank{self.rank}.pt"), map_location="cpu", weights_only=False)
        self.batches.load_state(mine["data"])
        set_rng_state(mine["rng"])

    def latest_checkpoint(self) -> Optional[str]:
        root = os.path.join(self.cfg.output_dir, CHECKPOINT_DIR)
        if not os.path.isdir(root):
            return None
        done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
        return os.path.join(root, done[-1]) if done else None

    def _start_fresh(self) -> None:
        """A new run in a used directory: stale metrics and checkpoints of the old run would mix with ours
        (pruning keeps the highest step numbers, which could be the old run's), so they go, with a note."""
        if self.is_main:
            root = os.path.join(self.cfg.output_dir, CHECKPOINT_DIR)
            if os.path.isdir(root) and os.listdir(root):
                print(f"note: starting a new run in {self.cfg.output_dir}: removing the previous run's checkpoints "
                      "(pass resume_from / --resume to continue it instead)")
                shutil.rmtree(root)
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
        self._barrier()

    def _save_adapter(self, directory: str) -> None:
        """Call save_adapter_fn on rank 0; every rank must call this (FSDP2 gathers collectively).

        Under FSDP2 the trainable parameters are DTensor shards: they are gathered into full tensors and
        swapped in for the duration of the save, so the save function sees an ordinary model.
        """
        if self.save_adapter_fn is None:
            return
        model = _unwrap(self.model)
        sharded = any(hasattr(p, "full_tensor") for p in self.params)
        full = trainable_state_dict(model) if sharded else None  # collective: all ranks
        if self.is_main:
            if not sharded:
                self.save_adapter_fn(model, directory)
            else:
                swapped = []
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        owner_name, _, attr = name.rpartition(".")
                        owner = model.get_submodule(owner_name) if owner_name else model
                        swapped.append((owner, attr, owner._parameters[attr]))
                        owner._parameters[attr] = nn.Parameter(full[name], requires_grad=True)
                try:
                    self.save_adapter_fn(model, directory)
                finally:
                    for owner, attr, param in swapped:
                        owner._parameters[attr] = param
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # -- metrics ---------------------------------------------------------------------------------
    def _read_metrics(self) -> List[dict]:
        if not os.path.isfile(self.metrics_path):
            return []
        with open(self.metrics_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def _truncate_metrics(self) -> None:
        """On resume, drop records past the checkpoint: those steps are about to be redone."""
        if self.is_main:
            kept = [r for r in self._read_metrics() if r["step"] <= self.step]
            with open(self.metrics_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume_from: Optional[str] = None) -> TrainResult:
        """Run to cfg.max_steps. resume_from: a checkpoint directory, or "latest" for the newest one."""
        cfg = self.cfg
        if resume_from == "latest":
            resume_from = self.latest_checkpoint()
            if resume_from is None:
                raise ValueError(f"resume: no checkpoint under {os.path.join(cfg.output_dir, CHECKPOINT_DIR)}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self._truncate_metrics()
        else:
            seed_everything(cfg.seed + self.rank)  # distinct dropout draws per rank, same data order
            self._start_fresh()
        bar = _progress(cfg.max_steps, self.step, enabled=cfg.progress and self.is_main)
        start, last, last_eval = time.perf_counter(), {}, None
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            out = self._train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step += 1
            record = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                      "tokens_per_s": out["tokens"] / max(dt, 1e-9), "skipped": out["skipped"],
                      "skipped_total": self.skipped, "tokens_seen": self.tokens_seen, "epoch": self.batches.epoch}
            due_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps
            if due_eval and self.eval_data is not None:
                last_eval = self.evaluate()
                record.update(last_eval)
                bar.write(f"step {self.step}: eval loss {last_eval['eval_loss']:.4f}, "
                          f"perplexity {last_eval['eval_ppl']:.2f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or "eval_loss" in record:
                self._log(record)
            last = record
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            skipped=self.skipped)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self._save_adapter(cfg.output_dir)
        plot_path = None
        history = self._read_metrics() if self.is_main else []
        if self.is_main and cfg.plot:
            plot_path = plot_loss_curve(history, os.path.join(cfg.output_dir, PLOT_FILE))
        return TrainResult(step=self.step, loss=last.get("loss", float("nan")),
                           eval_loss=(last_eval or {}).get("eval_loss"), skipped_steps=self.skipped,
                           seconds=time.perf_counter() - start, metrics_path=self.metrics_path,
                           plot_path=plot_path, history=history)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    import sys

    # In a log file (CI, nohup) redraws pile up as \r-joined text: refresh at most every 10 s there.
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, initial=initial, disable=not enabled, desc="finetune", unit="step", dynamic_ncols=True,
                mininterval=interval)


def plot_loss_curve(history: List[dict], path: str) -> Optional[str]:
    """Training loss per step (and eval loss where measured) as a PNG; None with a warning without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss plot (pip install 'lora_kernels[train]')")
        return None
    train = [(r["step"], r["loss"]) for r in history if "loss" in r and not r.get("skipped")]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1.2, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=4, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("LoRA fine-tuning with lora_kernels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
