"""Local training data: JSONL or plain text, tokenized, response-only labels, packed to a fixed length.

Formats (chosen by the file's extension):
  *.jsonl / *.json  one JSON object per line: {"text": ...} (loss on every token) or
                    {"prompt": ..., "response": ...} (loss on the response only); blank lines are skipped
  anything else     plain UTF-8 text; documents are separated by blank lines

Every problem with a file names the file and the line, so a bad line in a 100k-line file is found at once;
a NUL byte (binary data, which is valid UTF-8) is refused with its line and byte offset.
Labels use -100 (PyTorch's cross-entropy ignore_index) for tokens that carry no loss.

load_packed streams: records are read lazily, tokenized a batch at a time and appended to the packer's
staging buffers (packing.py), so memory holds one batch of text and the packed tokens, never every record.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from .packing import IGNORE_INDEX, TokenPacker, pack_documents, text_encoder
from .progress import loading_bar

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
    if not os.path.isfile(path):
        raise DataError(path, None, "is not a regular file (a device, a pipe or a socket); pass a .jsonl or text file")


def check_data_file(flag: str, path: str) -> None:
    """A ValueError naming `flag` where `path` is not a data file we can read (before a run writes anything)."""
    try:
        _check_path(path)
    except DataError as err:
        raise ValueError(f"{flag} {path!r}: {str(err)[len(path) + 2:]}") from None  # the reason after "path: "


Advance = Callable[[int], None]  # told how many more bytes of the file have been read
BATCH_CHARS, BATCH_RECORDS = 1 << 20, 1024  # one tokenizer call per ~1 MB of text or 1024 documents
READ_BYTES = 1 << 20
COMPACT_ROWS = 4096  # rows moved per step by split_eval(in_place=True)


def _blocks(path: str, advance: Optional[Advance]) -> Iterator[Tuple[int, List[str]]]:
    """(number of its first line, its lines) for each ~1 MB block of whole lines of the file.

    One read, one NUL search and one UTF-8 decode per block: per line, Python's own overhead would be
    most of the loading time of a large text file. Invalid UTF-8 and NUL bytes are DataErrors naming the
    line (and, for NUL, the byte offset in the file).
    """
    lineno, offset, parts = 1, 0, []
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            cut = block.rfind(b"\n") + 1
            if block and cut == 0:  # inside a long line: gather until it ends
                parts.append(block)
                continue
            parts.append(block[:cut] if block else b"")
            data = b"".join(parts)
            parts = [block[cut:]] if block and cut < len(block) else []
            if data:
                lines = _decode_block(path, data, lineno, offset).split("\n")
                if lines[-1] == "":  # the block ends with a newline
                    lines.pop()
                yield lineno, lines
                lineno, offset = lineno + len(lines), offset + len(data)
                if advance is not None:
                    advance(len(data))
            if not block:
                return


def _decode_block(path: str, data: bytes, lineno: int, offset: int) -> str:
    if offset == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(path, 1, "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if offset == 0 and data[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark (some editors write one)
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(path, lineno + data.count(b"\n", 0, nul), f"NUL byte at byte offset {offset + nul} of "
                                                                   "the file: this is binary data, not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise DataError(path, lineno + data.count(b"\n", 0, err.start),
                        f"not valid UTF-8 ({err.reason} at byte {err.start - line_start})") from None


def _iter_jsonl(path: str, advance: Optional[Advance]) -> Iterator[Record]:
    for first, lines in _blocks(path, advance):
        for lineno, line in enumerate(lines, start=first):
            if line and not line.isspace():
                yield _jsonl_record(path, lineno, line)


def _jsonl_record(path: str, lineno: int, line: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(path, lineno, f"invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(path, lineno, "JSON nested too deeply to read (a data line is one flat object)") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    where = f"{path}:{lineno}"
    for key in ("text", "prompt", "response"):
        if isinstance(obj.get(key), str) and not _encodable(obj[key]):
            raise DataError(path, lineno, f"{key!r} holds a lone surrogate (an escape like \\ud800 that is not "
                                          "half of a pair): not text any tokenizer can encode")
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(path, lineno, "'text' must be a non-empty string")
        return Record(obj["text"], None, where)
    elif "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(path, lineno, f"has 'prompt' or 'response' but no {key!r}")
            if not isinstance(obj[key], str):
                raise DataError(path, lineno, f"{key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj["response"]:
            raise DataError(path, lineno, "'response' is empty: there would be nothing to learn")
        return Record(obj["response"], obj["prompt"], where)
    else:
        raise DataError(path, lineno, f"expected a 'text' key or 'prompt' and 'response' keys, "
                                      f"got keys {sorted(obj)}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_text(path: str, advance: Optional[Advance]) -> Iterator[Record]:
    para, start = [], None
    for first, lines in _blocks(path, advance):
        for lineno, line in enumerate(lines, start=first):
            if line and not line.isspace():
                if not para:
                    start = lineno
                para.append(line.rstrip("\r"))
            elif para:
                yield Record("\n".join(para), None, f"{path}:{start}")
                para = []
    if para:
        yield Record("\n".join(para), None, f"{path}:{start}")


def iter_records(path: str, advance: Optional[Advance] = None) -> Iterator[Record]:
    """The records of one data file, read lazily; DataError (file:line: reason) on anything malformed.

    advance(n), if given, is called as the file is read with the number of bytes read since the last call.
    """
    path = os.fspath(path)
    _check_path(path)
    reader = _iter_jsonl if path.endswith((".jsonl", ".json")) else _iter_text
    n = 0
    for n, record in enumerate(reader(path, advance), start=1):
        yield record
    if n == 0:
        raise DataError(path, None, "contains no examples")


def read_records(path: str) -> List[Record]:
    """Every record of one data file as a list (load_packed streams instead; see iter_records)."""
    return list(iter_records(path))


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


def count_loss_tokens(labels: torch.Tensor) -> int:
    """How many positions of (rows, seq) labels carry loss: the loss predicts token t+1 from t, so the first
    label of a row never does."""
    # count_nonzero, not sum: sum promotes the bool mask to int64, an 8-byte copy per token of the whole set.
    return int((labels[:, 1:] != IGNORE_INDEX).count_nonzero())


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


def load_packed(path: str, tokenizer, seq_len: int, *, progress: Optional[bool] = None) -> PackedDataset:
    """The file's documents tokenized (encode_record's layout) and packed into rows of seq_len, streaming.

    progress: a loading bar on stderr (shown once loading takes over a second); None = on in the main
    process only (RANK unset or 0), so torchrun does not draw one bar per rank.
    """
    path = os.fspath(path)
    _check_path(path)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    packer = TokenPacker(seq_len, pad)  # checks seq_len before a large file is read
    if progress is None:
        progress = os.environ.get("RANK", "0") == "0"
    encode = text_encoder(tokenizer)
    with loading_bar(path, enabled=progress) as advance:
        batch, chars = [], 0
        for record in iter_records(path, advance):
            batch.append((record.prompt, record.text))
            chars += len(record.text) + len(record.prompt or "")
            if chars >= BATCH_CHARS or len(batch) >= BATCH_RECORDS:
                pack_documents(packer, batch, tokenizer, encode)
                batch, chars = [], 0
        if batch:
            pack_documents(packer, batch, tokenizer, encode)
    ds = PackedDataset(*packer.finish())
    if ds.num_loss_tokens() == 0:
        raise DataError(path, None, "no token carries loss after tokenization")
    return ds


def split_eval(ds: PackedDataset, fraction: float, seed: int = 0, *,
               in_place: bool = False) -> Tuple[PackedDataset, Optional[PackedDataset]]:
    """Hold out a fraction of rows for evaluation (at least one when fraction > 0 and two rows exist).

    in_place=True: the training rows are compacted to the front of ds's own tensors and returned as views,
    so only the eval rows are copied (for a large set, a second copy of ~all of it is the biggest allocation
    of loading); ds itself must not be used afterwards. Same rows, same order as in_place=False.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction!r}")
    n = len(ds)
    n_eval = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n >= 2 else 0
    if n_eval == 0:
        return ds, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ev, tr = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    held_out = PackedDataset(ds.input_ids[ev], ds.labels[ev])
    if not in_place:
        return PackedDataset(ds.input_ids[tr], ds.labels[tr]), held_out
    # tr is sorted, so tr[i] >= i: moving row tr[i] to row i, a block at a time, never overwrites a row a
    # later block still has to read.
    for t in (ds.input_ids, ds.labels):
        for i in range(0, len(tr), COMPACT_ROWS):
            rows = tr[i:i + COMPACT_ROWS]
            t[i:i + len(rows)] = t[rows]
    return PackedDataset(ds.input_ids[:len(tr)], ds.labels[:len(tr)]), held_out
