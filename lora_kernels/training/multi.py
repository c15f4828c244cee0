"""Several adapters trained at once on one base: every micro-batch mixes rows of all of them (batch_adapters),
so the frozen base runs once per batch for all adapters.

The rules, each chosen so that an adapter trains as it would alone on its own rows:
  rows        a micro-batch holds batch_size rows of each adapter, adapters in the order given, each adapter
              reading its own data in its own order (ShardedBatches with the run's seed: the rows a run of that
              adapter alone would read); N adapters make N x batch_size rows
  loss        the sum over adapters of each adapter's token-weighted mean loss over the step's micro-batches
              on all ranks (the token counts are summed over ranks).
              An adapter's parameters get gradient from its own rows only, so its gradient is exactly that of
              its mean loss alone. (The mean over all tokens of the batch would instead scale each adapter's
              gradient by its share of the batch's loss tokens, and the 1/N of a mean over adapters likewise.)
  clipping    per adapter: max_grad_norm bounds each adapter's own gradient norm, so one adapter's large
              gradient does not shrink another's update
  skipping    a non-finite gradient norm in any adapter skips the whole step (as fp16's GradScaler does)
  optimizer   one AdamW over all adapters (element-wise, so it is N independent ones), one LR schedule
  reporting   loss/NAME and eval_loss/NAME per adapter; `loss` and `eval_loss` are their mean over adapters
              (each adapter weighs the same, however many tokens it has)

Checkpoints hold every adapter's tensors and optimizer state, and each adapter's data cursor, so a resumed
run continues bit for bit as the base Trainer's does.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import batch_adapters
from ..data.batches import ShardedBatches
from ..data.loader import IGNORE_INDEX, PackedDataset, count_loss_tokens
from ..inject import adapter_parameters, lora_layers, model_adapters
from .distributed import full_tensor, loss_denominators, sum_over_ranks, unwrap
from .loop import TrainConfig, Trainer, _logits
from .rundir import adapter_folder_outputs



def adapter_outputs(names: Sequence[str]) -> Tuple[str, ...]:
    """The manifest entries a multi-adapter run adds to rundir.run_outputs: OUTPUT_DIR/NAME/ holds an adapter, and
    only its files belong to the run (the folder may be one the user keeps other things in)."""
    return tuple(e for name in names for e in adapter_folder_outputs(name))


class MixedBatches:
    """Micro-batches of batch_size rows of each adapter: one ShardedBatches per adapter, concatenated.

    next() -> (input_ids, labels, names): names has one adapter name per row, for batch_adapters. An adapter's
    last batch of an epoch may be shorter, so row counts are read from what each source returns.
    """

    def __init__(self, data: Dict[str, PackedDataset], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.sources: Dict[str, ShardedBatches] = {}
        for name, ds in data.items():
            try:
                self.sources[name] = ShardedBatches(ds, batch_size, seed, rank, world)
            except ValueError as err:
                raise ValueError(f"adapter {name!r}: {err}") from None

    @property
    def epoch(self) -> int:
        """The passes every adapter's data has completed."""
        return min(src.epoch for src in self.sources.values())

    def epochs(self) -> Dict[str, int]:
        return {name: src.epoch for name, src in self.sources.items()}

    def state(self) -> dict:
        return {name: src.state() for name, src in self.sources.items()}

    def load_state(self, state: dict) -> None:
        if sorted(state) != sorted(self.sources):
            raise ValueError(f"resume: the checkpoint's data cursors are for adapters {sorted(state)}, this run "
                             f"trains {sorted(self.sources)}")
        for name, src in self.sources.items():
            src.load_state(state[name])

    def next(self) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        ids, labels, names = [], [], []
        for name, src in self.sources.items():
            i, lab = src.next()
            ids.append(i)
            labels.append(lab)
            names += [name] * len(i)
        return torch.cat(ids), torch.cat(labels), names


def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) float32: each row's sum of next-token cross-entropies over positions whose label is not ignored."""
    per_token = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.view(labels.shape[0], -1).sum(dim=1)


def mixed_loss(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str],
               denominators: Dict[str, float]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(loss to backpropagate, {adapter: its part, detached}) of one mixed micro-batch.

    Each adapter's part is its rows' loss sum divided by denominators[adapter] (its loss tokens over the whole
    step); the loss is the sum of the parts, so each adapter's gradient is that of its own mean loss.
    """
    sums = row_loss_sums(logits, labels)
    weights = torch.tensor([1.0 / denominators[n] for n in names], dtype=sums.dtype, device=sums.device)
    loss = (sums * weights).sum()
    parts = {}
    for name in dict.fromkeys(names):
        rows = torch.tensor([n == name for n in names], device=sums.device)
        parts[name] = (sums[rows].sum() / denominators[name]).detach()
    return loss, parts


def _loss_tokens_by_adapter(labels: torch.Tensor, names: Sequence[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for name in dict.fromkeys(names):
        rows = torch.tensor([n == name for n in names])
        counts[name] = count_loss_tokens(labels[rows])
    return counts


class MultiAdapterTrainer(Trainer):
    """Train several adapters of one model at once, each on its own data (the rules in the module docstring).

    model: a model holding exactly these adapters (lk.inject_lora once per name), nothing else trainable.
    train_data / eval_data: {adapter name: PackedDataset}; eval_data may lack some adapters (they are not
    evaluated). save_adapter(model, directory, name) writes one adapter; the run's adapters go to
    output_dir/NAME/ (checkpoints: checkpoints/step-N/adapter/NAME/).
    """

    def __init__(self, model: nn.Module, train_data: Dict[str, PackedDataset], config: TrainConfig,
                 eval_data: Optional[Dict[str, PackedDataset]] = None,
                 save_adapter: Optional[Callable[[nn.Module, str, str], None]] = None,
                 device: Optional[torch.device] = None):
        if not isinstance(train_data, dict) or not train_data:
            raise ValueError("train_data must be a non-empty dict {adapter name: PackedDataset}")
        self.names = list(train_data)
        held = model_adapters(model)
        if sorted(held) != sorted(self.names):
            raise ValueError(f"the model's adapters {held} are not the adapters with training data {self.names}")
        unknown = sorted(set(eval_data or {}) - set(self.names))
        if unknown:
            raise ValueError(f"eval_data names adapters {unknown} that have no training data {self.names}")
        self._adapter_params(model)  # refuse before anything is moved or wrapped

        def save_all(m: nn.Module, directory: str) -> None:
            for name in self.names:
                save_adapter(m, os.path.join(directory, name), name)

        super().__init__(model, train_data, config, eval_data=eval_data or None,
                         save_adapter=save_all if save_adapter is not None else None, device=device)
        self.adapter_params = self._adapter_params(unwrap(self.model))  # FSDP2 has replaced the parameters

    def _adapter_params(self, model: nn.Module) -> Dict[str, List[nn.Parameter]]:
        """{adapter: its trainable parameters}; they must be all the trainable parameters there are, since each
        group is clipped on its own and a parameter shared by all rows would belong to no adapter."""
        groups = {name: [] for name in self.names}
        for layer in lora_layers(model).values():
            for name in layer.adapter_names:
                groups[name] += [p for p in adapter_parameters(layer, name) if p.requires_grad]
        grouped = {id(p) for ps in groups.values() for p in ps}
        shared = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
        if shared:
            raise ValueError(f"{len(shared)} trainable parameter(s) belong to no adapter (e.g. {shared[0]!r}); "
                             "training several adapters at once trains adapter tensors only")
        empty = [name for name, ps in groups.items() if not ps]
        if empty:
            raise ValueError(f"adapter(s) {empty} have no trainable parameter")
        return groups

    def _make_batches(self, train_data):
        cfg = self.cfg
        return MixedBatches(train_data, cfg.batch_size, cfg.seed, self.rank, self.world)

    def _extra_run_outputs(self) -> Tuple[str, ...]:
        return adapter_outputs(self.names)

    @contextlib.contextmanager
    def _mixed(self, names: List[str]):
        with batch_adapters(unwrap(self.model), names):
            yield

    # -- one step --------------------------------------------------------------------------------
    def _train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        micro = [self.batches.next() for _ in range(cfg.grad_accum)]
        denom = {name: 0 for name in self.names}
        for _, labels, names in micro:
            for name, n in _loss_tokens_by_adapter(labels, names).items():
                denom[name] += n
        denom = dict(zip(self.names, loss_denominators([denom[n] for n in self.names], self.world, self.device)))
        parts = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        for i, (ids, labels, names) in enumerate(micro):
            ids, labels = ids.to(self.device), labels.to(self.device)
            last = i == len(micro) - 1
            sync = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with self._mixed(names), self._autocast():
                    logits = _logits(self.model, ids)
                loss, mine = mixed_loss(logits, labels, names, denom)
                self.scaler.scale(loss).backward()
            parts += torch.stack([mine[name].double() for name in self.names])
        self.scaler.unscale_(self.optimizer)
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        norms = {name: float(full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))
                 for name, params in self.adapter_params.items()}
        grad_norm = math.sqrt(sum(n * n for n in norms.values()))
        lr, finite = self._update(grad_norm)
        tokens = sum(ids.numel() for ids, _, _ in micro) * self.world
        self.tokens_seen += tokens
        losses = (sum_over_ranks(parts, self.world) / self.world).tolist()
        extra = {f"loss/{name}": v for name, v in zip(self.names, losses)}
        extra.update({f"grad_norm/{name}": n for name, n in norms.items()})
        extra.update({f"epoch/{name}": e for name, e in self.batches.epochs().items()})
        return {"loss": sum(losses) / len(losses), "lr": lr, "grad_norm": grad_norm, "skipped": not finite,
                "tokens": tokens, "extra": extra}

    @torch.no_grad()
    def evaluate(self, progress: Optional[Callable[[int, int], None]] = None) -> Optional[Dict[str, float]]:
        """Each evaluated adapter's token-weighted mean loss on (at most cfg.eval_batches batches per rank of) its
        eval set, in mixed batches of batch_size rows per adapter; eval_loss is their mean over adapters."""
        if self.eval_data is None:
            return None
        self.model.eval()
        bs, names = self.cfg.batch_size, list(self.eval_data)
        rows = {}
        for name in names:
            mine = list(range(self.rank, len(self.eval_data[name]), self.world))
            rows[name] = mine[: self.cfg.eval_batches * bs] if self.cfg.eval_batches else mine
        total = torch.zeros(len(names), 3, dtype=torch.float64, device=self.device)  # loss sum, tokens, rows
        total[:, 2] = torch.tensor([len(rows[name]) for name in names], dtype=torch.float64)
        longest = max(len(r) for r in rows.values())
        n_batches = -(-longest // bs)
        for i in range(0, longest, bs):
            ids, labels, row_names = [], [], []
            for name in names:
                idx = torch.tensor(rows[name][i:i + bs], dtype=torch.long)
                ids.append(self.eval_data[name].input_ids[idx])
                labels.append(self.eval_data[name].labels[idx])
                row_names += [name] * len(idx)
            ids, labels = torch.cat(ids).to(self.device), torch.cat(labels).to(self.device)
            with self._mixed(row_names), self._autocast():
                logits = _logits(self.model, ids)
            sums = row_loss_sums(logits, labels)
            for k, name in enumerate(names):
                sel = torch.tensor([n == name for n in row_names], device=self.device)
                total[k, 0] += float(sums[sel].sum())
                total[k, 1] += count_loss_tokens(labels[sel])
            if progress is not None:
                progress(i // bs + 1, n_batches)
        sum_over_ranks(total, self.world)
        self.model.train()
        per = {name: float(total[k, 0] / total[k, 1].clamp(min=1)) for k, name in enumerate(names)}
        loss = sum(per.values()) / len(per)
        out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_rows": int(total[:, 2].sum())}
        out.update({f"eval_loss/{name}": v for name, v in per.items()})
        return out

    def _eval_detail(self, result: dict) -> str:
        return "; " + ", ".join(f"{name} {result[f'eval_loss/{name}']:.4f}" for name in self.eval_data)

    def _loss_text(self, out: dict) -> str:
        """The mean, then each adapter's: tqdm sorts postfix fields by name, so they stay together in one."""
        return f"{out['loss']:.3f} (" + ", ".join(f"{n} {out['extra'][f'loss/{n}']:.3f}" for n in self.names) + ")"
