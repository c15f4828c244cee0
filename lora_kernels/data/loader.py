"""Local training data: JSONL or plain text, tokenized, response-only labels, packed to a fixed length.

Formats (chosen by the file's extension):
  *.jsonl / *.json  one JSON object per line: {"text": ...} (loss on every token) or
                    {"prompt": ..., "response": ...} (loss on the response only); blank lines are skipped
  anything else     plain UTF-8 text; documents are separated by blank lines

Every problem with a file names the file and the line, so a bad line in a 100k-line file is found at once.
Labels use -100 (PyTorch's cross-entropy ignore_index) for tokens that carry no loss.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch

IGNORE_INDEX = -100
DEMO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.jsonl")


class DataError(ValueError):
    """A data file problem; the message starts with `file:line:` where a line is known."""

    def __init__(self, path: str, line: Optional[int], message: str):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


@dataclass
class Record:
    """One document. prompt is None for plain text (loss on everything)."""

    text: str
    prompt: Optional[str] = None
    source: str = ""


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(path, None, "no such file")
    if os.path.isdir(path):
        raise DataError(path, None, "is a directory; pass a .jsonl or text file")


def _read_jsonl(path: str) -> List[Record]:
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, lineno, f"invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            where = f"{path}:{lineno}"
            if "text" in obj:
                if not isinstance(obj["text"], str) or not obj["text"]:
                    raise DataError(path, lineno, "'text' must be a non-empty string")
                records.append(Record(obj["text"], None, where))
            elif "prompt" in obj or "response" in obj:
                for key in ("prompt", "response"):
                    if key not in obj:
                        raise DataError(path, lineno, f"has 'prompt' or 'response' but no {key!r}")
                    if not isinstance(obj[key], str):
                        raise DataError(path, lineno, f"{key!r} must be a string, got {type(obj[key]).__name__}")
                if not obj["response"]:
                    raise DataError(path, lineno, "'response' is empty: there would be nothing to learn")
                records.append(Record(obj["response"], obj["prompt"], where))
            else:
                raise DataError(path, lineno, f"expected a 'text' key or 'prompt' and 'response' keys, "
                                              f"got keys {sorted(obj)}")
    return records


def _read_text(path: str) -> List[Record]:
    records, para, start = [], [], None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(path, lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if line.strip():
                if not para:
                    start = lineno
                para.append(line)
            elif para:
                records.append(Record("\n".join(para), None, f"{path}:{start}"))
                para = []
    if para:
        records.append(Record("\n".join(para), None, f"{path}:{start}"))
    return records


def read_records(path: str) -> List[Record]:
    """Parse one data file into records; raises DataError (file:line: reason) on anything malformed."""
    path = os.fspath(path)
    _check_path(path)
    records = _read_jsonl(path) if path.endswith((".jsonl", ".json")) else _read_text(path)
    if not records:
        raise DataError(path, None, "contains no examples")
    return records


def encode_record(record: Record, tokenizer) -> Tuple[List[int], List[int]]:
    """Token ids and labels of one document: [bos] prompt response [eos]; prompt and bos carry no loss.

    Prompt and response are tokenized separately (as TRL does) so the loss boundary is exact.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    head = [bos] if bos is not None else []
    if record.prompt is not None:
        head = head + list(tokenizer.encode(record.prompt, add_special_tokens=False))
    body = list(tokenizer.encode(record.text, add_special_tokens=False))
    if eos is not None:
        body.append(eos)
    return head + body, [IGNORE_INDEX] * len(head) + body


def pack(examples: Iterable[Tuple[List[int], List[int]]], seq_len: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents and cut the stream into rows of seq_len; the last row is padded (no loss).

    Documents may span rows (standard packing): no token is dropped and no compute is spent on padding
    except in the final row.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    ids, labels = [], []
    for i, l in examples:
        ids.extend(i)
        labels.extend(l)
    if not ids:
        raise ValueError("pack: no tokens to pack")
    rem = (-len(ids)) % seq_len
    ids.extend([pad_id] * rem)
    labels.extend([IGNORE_INDEX] * rem)
    ids_t = torch.tensor(ids, dtype=torch.long).view(-1, seq_len)
    labels_t = torch.tensor(labels, dtype=torch.long).view(-1, seq_len)
    return ids_t, labels_t


def count_loss_tokens(labels: torch.Tensor) -> int:
    """How many positions of (rows, seq) labels carry loss: the loss predicts token t+1 from t, so the first
    label of a row never does."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed (input_ids, labels); labels are aligned with input_ids (the loss shifts them)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        if input_ids.shape != labels.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids and labels must be equal 2-D shapes, got {tuple(input_ids.shape)} "
                             f"and {tuple(labels.shape)}")
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i]

    def num_loss_tokens(self) -> int:
        return count_loss_tokens(self.labels)


def load_packed(path: str, tokenizer, seq_len: int) -> PackedDataset:
    """read_records + encode_record + pack, with a check that some token carries loss."""
    records = read_records(path)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    ids, labels = pack((encode_record(r, tokenizer) for r in records), seq_len, pad)
    ds = PackedDataset(ids, labels)
    if ds.num_loss_tokens() == 0:
        raise DataError(os.fspath(path), None, "no token carries loss after tokenization")
    return ds


def split_eval(ds: PackedDataset, fraction: float, seed: int = 0) -> Tuple[PackedDataset, Optional[PackedDataset]]:
    """Hold out a fraction of rows for evaluation (at least one when fraction > 0 and two rows exist)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction!r}")
    n = len(ds)
    n_eval = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n >= 2 else 0
    if n_eval == 0:
        return ds, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ev, tr = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    return (PackedDataset(ds.input_ids[tr], ds.labels[tr]), PackedDataset(ds.input_ids[ev], ds.labels[ev]))
