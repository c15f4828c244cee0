"""The package's one timer: CUDA events around each repetition on a GPU, perf_counter elsewhere.

Used by the GEMM-path dispatcher (backends/gemm_dispatch.py), `lora-kernels bench` and the benchmark suites
in bench/. On a GPU each timed repetition can be preceded by overwriting a 256 MiB buffer, so no operand is
served from L2 (an H100 and an H200 have 50 MB of it), which is how a layer meets its inputs inside a real
network. Without a GPU the numbers only prove that the code runs; they are not results.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch

L2_FLUSH_BYTES = 256 * 2**20


class Timer:
    """Median / min milliseconds of a callable over `reps` repetitions after `warmup` untimed ones.

    flush_l2: overwrite L2_FLUSH_BYTES before every timed repetition (GPU only). The benchmarks flush;
    the dispatcher, which compares two paths on the same operands mid-training, does not allocate it.
    """

    def __init__(self, device, warmup: int, reps: int, flush_l2: bool = True):
        if warmup < 1 or reps < 1:
            raise ValueError(f"warmup and reps must be >= 1 (warm-up also triggers Triton's autotuning), "
                             f"got warmup={warmup}, reps={reps}")
        self.device = torch.device(device)
        self.warmup, self.reps = warmup, reps
        self.cuda = self.device.type == "cuda"
        self._flush_buf = (torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=self.device)
                           if self.cuda and flush_l2 else None)

    @property
    def method(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter (CPU smoke, not a result)"

    def flush(self) -> None:
        if self._flush_buf is not None:
            self._flush_buf.zero_()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _timed(self, run: Callable[[Any], Any], state: Any) -> Callable[[], float]:
        """Run once now; return a function that yields its milliseconds (after a sync on a GPU)."""
        self.flush()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            return lambda: start.elapsed_time(end)
        t0 = time.perf_counter()
        run(state)
        ms = (time.perf_counter() - t0) * 1e3
        return lambda: ms

    def measure(self, run: Callable[[Any], Any], prepare: Optional[Callable[[], Any]] = None) -> dict:
        """Median and min milliseconds of run(prepare()) over `reps`; prepare() itself is not timed.

        prepare is how backward alone is timed: it runs the forward and hands over its output.
        """
        return self.compare({"run": (run, prepare)})["run"]

    def compare(self, runs: Dict[str, tuple]) -> Dict[str, dict]:
        """measure() for several {name: (run, prepare or None)}, repetitions interleaved name by name so a
        drifting clock (boost, thermals) affects every candidate alike."""
        for _ in range(self.warmup):
            for run, prepare in runs.values():
                run(prepare() if prepare else None)
        self.sync()
        pending = {name: [] for name in runs}
        for _ in range(self.reps):
            for name, (run, prepare) in runs.items():
                pending[name].append(self._timed(run, prepare() if prepare else None))
        self.sync()
        out = {}
        for name, readers in pending.items():
            times = [read() for read in readers]
            out[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}
        return out
