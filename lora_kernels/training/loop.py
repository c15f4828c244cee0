"""A plain-PyTorch LoRA training loop: no Trainer subclass, nothing hidden.

What a step does, in order:
  1. fetch grad_accum micro-batches, count the tokens that carry loss over all of them
  2. forward/backward each under autocast (bf16, or fp16 with a GradScaler); the loss is a token-weighted
     sum divided by the step's loss-token count, so accumulation equals one big batch exactly
  3. clip the gradient norm (logged every step); a non-finite norm skips the update and is counted
  4. AdamW over the trainable parameters only, then the warmup + cosine schedule
  5. log a JSONL record, evaluate (loss, perplexity) and checkpoint when due

Checkpoints (checkpoint.py) make a resumed run continue bit-for-bit on CPU; several processes and FSDP2
are distributed.py's; metrics.jsonl, the progress bar and the loss plot are metrics.py's.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batches import ShardedBatches
from ..data.loader import IGNORE_INDEX, PackedDataset, count_loss_tokens
from .checkpoint import (checkpoint_root, get_rng_state, latest_checkpoint, read_checkpoint, seed_everything,
                         set_rng_state, write_checkpoint)
from .divergence import DivergenceGuard
from .distributed import (STRATEGIES, barrier, full_tensor, gathered_trainable, init_distributed,
                          load_optimizer_state_dict, load_trainable_state_dict, optimizer_state_dict,
                          loss_denominators, resolve_strategy, sum_over_ranks, trainable_state_dict, unwrap, wrap_model)
from .interrupt import TrainingInterrupted, stop_on_sigint
from .metrics import METRICS_FILE, PLOT_FILE, MetricsLog, eval_progress, plot_loss_curve, progress_bar
from .rundir import run_outputs, start_run

PRECISIONS = ("fp32", "bf16", "fp16")
# Eval batches per evaluation. A no-grad eval batch costs 0.27 of a training step (tiny default, CPU), so 16
# batches cost ~4.3 steps: under 10 % of the 50 steps between evaluations of the default run, and a final eval
# that takes seconds however large the held-out set is (the whole 5 % of a 50 MB file took 23 minutes).
EVAL_MAX_BATCHES = 16


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
    eval_batches: int = EVAL_MAX_BATCHES  # batches per evaluation (the same first rows each time); 0: all
    save_every: int = 0              # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    progress: bool = True
    plot: bool = True
    strategy: str = "auto"           # auto: DDP when WORLD_SIZE > 1
    overwrite: bool = False          # a new run in a directory holding a previous run: replace it (else refuse)

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
    already_finished: bool = False   # resumed at or past max_steps: nothing was trained or written


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at `step` (0-based): linear warmup to 1, then cosine down to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (float32) over positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    core = unwrap(model)
    if hasattr(core, "config") and hasattr(core.config, "use_cache"):
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


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
        self.strategy = resolve_strategy(config.strategy, self.world)
        if self.strategy != "fsdp":
            model.to(self.device)
        # FSDP2: fully_shard moves each block to the mesh's device as it shards it, so the whole model never
        # has to fit on one GPU at once.
        self.model = wrap_model(model, self.strategy, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train "
                             "(inject LoRA first, e.g. lora_kernels.inject_lora)")
        self.param_names = [n for n, p in unwrap(self.model).named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.max_steps, config.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.batches = self._make_batches(train_data)
        self.eval_data = eval_data
        self.step = 0
        self.skipped = 0
        self.tokens_seen = 0
        os.makedirs(config.output_dir, exist_ok=True)
        self.metrics = MetricsLog(os.path.join(config.output_dir, METRICS_FILE), writer=self.is_main)

    def _make_batches(self, train_data):
        """This rank's micro-batch source: next(), state(), load_state(), epoch (multi.py mixes several)."""
        cfg = self.cfg
        return ShardedBatches(train_data, cfg.batch_size, cfg.seed, self.rank, self.world)

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
        denom, = loss_denominators([sum(count_loss_tokens(lab) for _, lab in micro)], self.world, self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # one host sync per step, not per micro
        for i, (ids, labels) in enumerate(micro):
            ids, labels = ids.to(self.device), labels.to(self.device)
            last = i == len(micro) - 1
            # DDP: all-reduce the gradients once, on the last micro-batch.
            sync = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    logits = _logits(self.model, ids)
                loss = causal_lm_loss_sum(logits, labels) / denom
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, clip)))
        lr, finite = self._update(grad_norm)
        tokens = sum(ids.numel() for ids, _ in micro) * self.world
        self.tokens_seen += tokens
        mean_loss = sum_over_ranks(loss_sum.reshape(1), self.world).item() / self.world
        return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "skipped": not finite, "tokens": tokens}

    @torch.no_grad()
    def evaluate(self, progress: Optional[Callable[[int, int], None]] = None) -> Optional[Dict[str, float]]:
        """Token-weighted mean loss and perplexity on (at most cfg.eval_batches batches per rank of) the eval set;
        each rank takes a slice, summed. progress(done, total) is called after each batch."""
        if self.eval_data is None:
            return None
        self.model.eval()
        ds, bs = self.eval_data, self.cfg.batch_size
        rows = list(range(self.rank, len(ds), self.world))
        if self.cfg.eval_batches:
            rows = rows[: self.cfg.eval_batches * bs]
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, loss tokens, rows
        total[2] = len(rows)
        n_batches = -(-len(rows) // bs)
        for i in range(0, len(rows), bs):
            idx = torch.tensor(rows[i:i + bs])
            ids, labels = ds.input_ids[idx].to(self.device), ds.labels[idx].to(self.device)
            with self._autocast():
                logits = _logits(self.model, ids)
            total[0] += float(causal_lm_loss_sum(logits, labels))
            total[1] += count_loss_tokens(labels)
            if progress is not None:
                progress(i // bs + 1, n_batches)
        sum_over_ranks(total, self.world)
        self.model.train()
        loss = float(total[0] / total[1].clamp(min=1))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_rows": int(total[2])}

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write checkpoints/step-<step>; every rank must call it (FSDP2 gathers collectively)."""
        fsdp = self.strategy == "fsdp"
        state = {"optimizer": optimizer_state_dict(self.model, self.optimizer, fsdp),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "skipped": self.skipped, "tokens_seen": self.tokens_seen, "world_size": self.world,
                 "config": asdict(self.cfg)}
        return write_checkpoint(self.cfg.output_dir, self.step, trainable_state_dict(self.model), state,
                                {"rng": get_rng_state(), "data": self.batches.state()}, rank=self.rank,
                                world=self.world, keep=self.cfg.keep_checkpoints, save_adapter=self._save_adapter)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything save_checkpoint wrote; the next step is the one after the checkpoint's."""
        trainable, state, mine = read_checkpoint(path, self.rank, self.world, self.param_names)
        load_trainable_state_dict(self.model, trainable)
        try:  # what torch, numpy and random refuse in a crafted state: one line naming the checkpoint
            load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], self.strategy == "fsdp")
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.batches.load_state(mine["data"])
            set_rng_state(mine["rng"])
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as err:
            raise ValueError(f"resume: checkpoint {path!r} holds a malformed state ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        self.step, self.skipped, self.tokens_seen = state["step"], state["skipped"], state["tokens_seen"]

    def latest_checkpoint(self) -> Optional[str]:
        return latest_checkpoint(self.cfg.output_dir)

    def _start_fresh(self) -> None:
        """A new run in a used directory would mix its metrics and checkpoints with the old run's (pruning keeps
        the highest step numbers, which could be the old run's): refuse, or clear them when cfg.overwrite."""
        start_run(self.cfg.output_dir, self.cfg.overwrite, run_outputs(self._extra_run_outputs()),
                  clear=self.is_main, reuse_all=False)  # reuse_all=False: the CLI may have saved the base first
        barrier(self.world)  # nobody writes before rank 0 has cleared
        self.metrics.clear()
        barrier(self.world)

    def _extra_run_outputs(self) -> Tuple[str, ...]:
        """Manifest entries beyond rundir.run_outputs that this trainer writes into output_dir (relative paths)."""
        return ()

    def _save_adapter(self, directory: str) -> None:
        """save_adapter_fn(unwrapped model, directory) on rank 0; every rank calls this (FSDP2 gathers)."""
        if self.save_adapter_fn is None:
            return
        with gathered_trainable(self.model, self.is_main) as model:
            if self.is_main:
                self.save_adapter_fn(model, directory)
        barrier(self.world)

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume_from: Optional[str] = None) -> TrainResult:
        """Run to cfg.max_steps. resume_from: a checkpoint directory, or "latest" for the newest one.

        Ctrl-C (SIGINT, main thread) stops at the next step boundary, writes a checkpoint there and raises
        TrainingInterrupted (a KeyboardInterrupt); resuming continues exactly. A run resumed at or past
        max_steps trains and writes nothing and returns already_finished=True.
        """
        cfg = self.cfg
        if resume_from == "latest":
            resume_from = self.latest_checkpoint()
            if resume_from is None:
                raise ValueError(f"resume: no checkpoint under {checkpoint_root(cfg.output_dir)}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            if self.step >= cfg.max_steps:
                return self._finished_result()
            self.metrics.truncate(self.step)
        else:
            seed_everything(cfg.seed + self.rank)  # distinct dropout draws per rank, same data order
            self._start_fresh()
        bar = progress_bar(cfg.max_steps, self.step, enabled=cfg.progress and self.is_main)
        start, last, last_eval = time.perf_counter(), {}, None
        guard = DivergenceGuard(cfg.max_steps, self.scaler.is_enabled())
        with stop_on_sigint(notify=bar.write if self.is_main else None) as stop:
            while self.step < cfg.max_steps:
                last = self._step_and_report(bar)
                guard.after_step(last, self.step, self.latest_checkpoint, on_stop=bar.close)
                last_eval = {k: last[k] for k in ("eval_loss", "eval_ppl") if k in last} or last_eval
                saved = None
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    saved = self.save_checkpoint()
                if self._stop_requested(stop) and self.step < cfg.max_steps:
                    bar.close()
                    raise TrainingInterrupted(self.step, saved or self.save_checkpoint())
        bar.close()
        # The adapter before the final checkpoint: if the run dies between the two, --resume redoes the last
        # stretch and writes both, rather than finding a finished run whose adapter was never written.
        self._save_adapter(cfg.output_dir)
        self.save_checkpoint()
        history = self.metrics.read() if self.is_main else []
        plot_path = None
        if self.is_main and cfg.plot:
            plot_path = plot_loss_curve(history, os.path.join(cfg.output_dir, PLOT_FILE))
        return TrainResult(step=self.step, loss=last.get("loss", float("nan")),
                           eval_loss=(last_eval or {}).get("eval_loss"), skipped_steps=self.skipped,
                           seconds=time.perf_counter() - start, metrics_path=self.metrics.path,
                           plot_path=plot_path, history=history)

    def _step_and_report(self, bar) -> dict:
        """One optimizer step, then its eval (when due), metrics record and progress bar; returns the record."""
        cfg = self.cfg
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
        record.update(out.get("extra", {}))  # e.g. multi.py's per-adapter losses and grad norms
        if due_eval and self.eval_data is not None:
            result = self.evaluate(progress=eval_progress(bar))
            record.update(result)
            if self.is_main:  # tqdm's write prints even where the bar is disabled: once per run, not per rank
                bar.write(f"step {self.step}: eval loss {result['eval_loss']:.4f}, perplexity "
                          f"{result['eval_ppl']:.2f} ({result['eval_rows']} rows)" + self._eval_detail(result))
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or "eval_loss" in record:
            self.metrics.append(record)
        bar.update(1)
        bar.set_postfix(loss=self._loss_text(out), tok_s=f"{record['tokens_per_s']:.0f}", skipped=self.skipped)
        return record

    def _eval_detail(self, result: dict) -> str:
        """Text appended to the progress bar's eval line."""
        return ""

    def _loss_text(self, out: dict) -> str:
        """The loss as the progress bar shows it."""
        return f"{out['loss']:.3f}"

    def _update(self, grad_norm: float):
        """The optimizer and scheduler step after clipping; a non-finite gradient norm skips the update (and is
        counted). Returns (the learning rate used, whether the gradients were finite)."""
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
        return lr, finite

    def _stop_requested(self, stop) -> bool:
        """Whether any rank got Ctrl-C: all ranks must stop at the same step to checkpoint together."""
        if self.world == 1:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.device)
        return bool(sum_over_ranks(flag, self.world).item() > 0)

    def _finished_result(self) -> TrainResult:
        history = self.metrics.read() if self.is_main else []
        losses = [r["loss"] for r in history if "loss" in r]
        evals = [r["eval_loss"] for r in history if "eval_loss" in r]
        return TrainResult(step=self.step, loss=losses[-1] if losses else float("nan"),
                           eval_loss=evals[-1] if evals else None, skipped_steps=self.skipped, seconds=0.0,
                           metrics_path=self.metrics.path, plot_path=None, history=history, already_finished=True)
