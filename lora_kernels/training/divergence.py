"""A diverged run stops: several steps in a row with a non-finite loss or gradient end it with an error.

One such step is skipped and counted (a transient overflow); several in a row are a run that would only skip
or log NaN to the end and exit as if it had trained (e.g. --lora-alpha 1e308). The last good checkpoint is kept.
fp16's GradScaler skips steps while it finds its scale, so under it only the loss counts, not its skips.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

NONFINITE_STOP = 3


class DivergenceGuard:
    def __init__(self, max_steps: int, scaler_enabled: bool):
        self.limit = min(NONFINITE_STOP, max_steps)
        self.scaler_enabled = scaler_enabled
        self.run = 0

    def after_step(self, record: dict, step: int, latest: Callable[[], Optional[str]],
                   on_stop: Callable[[], None] = lambda: None) -> None:
        """ValueError (with the loss, the gradient norm and the kept checkpoint) once the limit is reached, after
        on_stop() (the progress bar closed)."""
        bad = not math.isfinite(record["loss"]) or (record["skipped"] and not self.scaler_enabled)
        self.run = self.run + 1 if bad else 0
        if self.run >= self.limit:
            on_stop()
            raise ValueError(f"the loss or its gradient was non-finite for {self.run} steps in a row, up to step "
                             f"{step} (loss {record['loss']}, gradient norm {record['grad_norm']}): training "
                             f"stopped, the last good checkpoint kept ({latest() or 'none yet'}); lower --lr or "
                             "--lora-alpha")
