"""What a run reports: metrics.jsonl (one record per logged step), the progress bar and loss_curve.png."""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import List, Optional

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


class MetricsLog:
    """metrics.jsonl in a run's output directory. Only the writer (rank 0) changes the file."""

    def __init__(self, path: str, writer: bool = True):
        self.path, self.writer = path, writer

    def append(self, record: dict) -> None:
        if self.writer:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> List[dict]:
        """The records; a torn last line (a crash mid-write) is left out with a notice, any other bad line is a
        ValueError naming the file and line."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
        records = []
        for n, (i, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            elif n == len(lines) - 1 and not line.endswith("\n"):
                if self.writer:
                    print(f"notice: {self.path}:{i}: ignoring a torn last line (a run stopped while writing it)",
                          file=sys.stderr)
            else:
                raise ValueError(f"{self.path}:{i}: not a metrics record (a JSON object with an integer 'step')")
        return records

    def truncate(self, step: int) -> None:
        """Drop the records past `step`: on resume, those steps are about to be redone."""
        if self.writer:
            kept = [r for r in self.read() if r["step"] <= step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def clear(self) -> None:
        if self.writer and os.path.exists(self.path):
            os.remove(self.path)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # In a log file (CI, nohup) redraws pile up as \r-joined text: refresh at most every 10 s there.
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, initial=initial, disable=not enabled, desc="finetune", unit="step", dynamic_ncols=True,
                mininterval=interval)


def eval_progress(bar):
    """A progress(done, total) callback for Trainer.evaluate that shows the eval batches on the bar.

    Redrawn at once on a terminal only: in a log file every redraw would be another line."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        bar.set_description(f"finetune: eval {done}/{total}" if done < total else "finetune", refresh=tty)

    return show


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
