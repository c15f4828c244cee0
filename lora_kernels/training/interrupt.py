"""Ctrl-C during training: finish the step, checkpoint, stop.

A KeyboardInterrupt raised in the middle of a step can land between backward and the optimizer update (or
inside AdamW's per-tensor loop), leaving a state no checkpoint should record. So the first SIGINT only asks
the loop to stop at the next step boundary, where a consistent checkpoint is written; a second one raises
KeyboardInterrupt at once (then no new checkpoint: the last complete one stays).
"""
from __future__ import annotations

import contextlib
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after `step` steps; `checkpoint` is the directory holding that step (or None)."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    requested = False


@contextlib.contextmanager
def stop_on_sigint(notify=None):
    """Yield a StopRequest whose `requested` turns True on the first SIGINT; the second SIGINT raises.

    Only the main thread can own signal handlers: elsewhere Ctrl-C keeps Python's default behaviour."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        if notify is not None:
            notify("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
