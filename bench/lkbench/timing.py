"""Timing: CUDA events around each repetition, L2 flushed before each, the median reported.

On a GPU, a 256 MiB buffer is overwritten before every timed repetition so no operand is served
from L2 (an H100 has 50 MB of L2, an H200 too), which is how a layer meets its inputs inside a real
network. Without a GPU the same code runs with time.perf_counter; those numbers only prove that the
code runs (smoke), they are not results.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 2**20


class Timer:
    def __init__(self, device: torch.device, warmup: int, reps: int):
        if warmup < 1 or reps < 1:
            raise ValueError(f"warmup and reps must be >= 1 (warm-up also triggers Triton's autotuning), "
                             f"got warmup={warmup}, reps={reps}")
        self.device = torch.device(device)
        self.warmup, self.reps = warmup, reps
        self.cuda = self.device.type == "cuda"
        self._flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=self.device) if self.cuda else None

    @property
    def method(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter (CPU smoke, not a result)"

    def flush(self) -> None:
        if self._flush_buf is not None:
            self._flush_buf.zero_()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, run: Callable[[Any], Any], prepare: Optional[Callable[[], Any]] = None) -> dict:
        """Median and min milliseconds of run(prepare()) over `reps`; prepare() itself is not timed.

        prepare is how backward alone is timed: it runs the forward and hands over its output.
        """
        state = None
        for _ in range(self.warmup):
            state = prepare() if prepare else None
            run(state)
            state = None
        self.sync()
        times = []
        if self.cuda:
            events = []
            for _ in range(self.reps):
                state = prepare() if prepare else None
                self.flush()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(state)
                end.record()
                state = None
                events.append((start, end))
            self.sync()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(self.reps):
                state = prepare() if prepare else None
                t0 = time.perf_counter()
                run(state)
                times.append((time.perf_counter() - t0) * 1e3)
                state = None
        return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}
