"""How long a row a model takes: --seq-len against the model's position limit."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn


def max_positions(model) -> Optional[int]:
    """The model's configured maximum sequence length (max_position_embeddings, GPT-2's n_positions), or None."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_seq_len(model, seq_len: int) -> Optional[str]:
    """None when seq_len fits the model; a warning when it exceeds the configured maximum of a model with
    computed positions (RoPE runs on, but the model never saw such lengths and attention cost grows with the
    square); a ValueError when the model looks positions up in a learned table of that size (GPT-2's wpe),
    where a longer row is an index error."""
    limit = max_positions(model)
    if limit is None or seq_len <= limit:
        return None
    if any(isinstance(m, nn.Embedding) and m.num_embeddings == limit and _is_position_table(name)
           for name, m in model.named_modules()):
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {limit} learned positions")
    return f"--seq-len {seq_len} is above the model's {limit} positions: expect poor quality and long steps"


def _is_position_table(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return leaf == "wpe" or "position" in leaf  # GPT-2 / GPT-Neo, BERT-style position_embeddings
