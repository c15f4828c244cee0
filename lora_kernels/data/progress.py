"""The progress bar while a data file loads: bytes read of the file's size, on stderr.

Same throttle as training's step bar (training/metrics.py): redraws at most every 0.1 s on a terminal and
every 10 s in a log file (CI, nohup), where each redraw is another line. Loads that finish within a second
(the demo set, tests) draw nothing.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

DELAY_S = 1.0  # no bar for loads shorter than this


@contextlib.contextmanager
def loading_bar(path: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields advance(n_bytes) for the reader to call; the bar closes with the block."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=os.path.getsize(path), desc=f"loading {os.path.basename(path)}", unit="B", unit_scale=True,
               unit_divisor=1024, file=sys.stderr, dynamic_ncols=True, delay=DELAY_S,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    try:
        yield bar.update
    finally:
        bar.close()
