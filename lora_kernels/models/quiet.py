"""transformers' own progress bars ("Loading weights", "Writing model shards") off while the CLI loads or
saves a model: for the small models it reads they flash by as noise on stderr, where the run's one-line
messages and errors go."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def no_progress_bars():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
