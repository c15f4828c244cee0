"""Tokenizing documents in batches and packing the token stream into fixed-length rows, in bounded memory.

The loader streams records through here: a batch of documents is tokenized at once (a fast Hugging Face
tokenizer encodes each distinct segment once where that is exact, see word_cache.py, else a batch on all cores;
the byte tokenizer is a buffer view), and its tokens are appended to staging chunks (an int32 id and a loss
flag per token). Only at the end are the (rows, seq_len) int64 tensors allocated, and each staging chunk is freed as it is copied in. Peak memory is the packed result
plus ~5 bytes a token of staging, not Python lists of every token (8 bytes a pointer, twice) plus the
records they came from.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .word_cache import SegmentEncoder, segmentable
from .tokenizer import ByteTokenizer

IGNORE_INDEX = -100
CHUNK_TOKENS = 1 << 20       # tokens per staging chunk (4 MiB of int32 ids + 1 MiB of loss flags)
PIECE_CHARS = 1 << 16        # longer texts are cut into pieces this long for a batch tokenizer


def check_seq_len(seq_len) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    return seq_len


class TokenPacker:
    """Append tokens with a loss flag each; finish() cuts the stream into rows of seq_len, the last row padded
    (no loss).

    Documents may span rows (standard packing): no token is dropped and no compute is spent on padding
    except in the final row. A label is the token itself where it carries loss and IGNORE_INDEX elsewhere,
    so staging keeps an int32 id and a one-byte flag per token (5 bytes, not the result's 16).
    """

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = check_seq_len(seq_len), int(pad_id)
        self._ids: List[np.ndarray] = []
        self._loss: List[np.ndarray] = []
        self._fill = CHUNK_TOKENS  # no open chunk yet
        self.num_tokens = 0

    def add(self, ids, loss) -> None:
        """Append tokens `ids`; loss: one bool for all of them or a bool array, True where a token carries loss."""
        ids = np.asarray(ids)
        loss = np.broadcast_to(np.asarray(loss, dtype=bool), ids.shape)
        start, n = 0, len(ids)
        while start < n:
            if self._fill == CHUNK_TOKENS:
                self._ids.append(np.empty(CHUNK_TOKENS, dtype=np.int32))
                self._loss.append(np.empty(CHUNK_TOKENS, dtype=bool))
                self._fill = 0
            take = min(CHUNK_TOKENS - self._fill, n - start)
            dst = slice(self._fill, self._fill + take)
            self._ids[-1][dst] = ids[start:start + take]
            self._loss[-1][dst] = loss[start:start + take]
            self._fill += take
            start += take
        self.num_tokens += n

    def finish(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each (rows, seq_len) int64; staging is released as it is copied out."""
        if self.num_tokens == 0:
            raise ValueError("pack: no tokens to pack")
        total = -(-self.num_tokens // self.seq_len) * self.seq_len
        ids = torch.empty(total, dtype=torch.long)
        pos = 0
        while self._ids:
            chunk = self._ids.pop(0)[: self.num_tokens - pos]
            ids[pos:pos + len(chunk)] = torch.from_numpy(chunk)
            pos += len(chunk)
            del chunk
        ids[pos:] = self.pad_id
        labels = ids.clone()
        pos = 0
        while self._loss:
            keep = torch.from_numpy(self._loss.pop(0)[: self.num_tokens - pos])
            labels[pos:pos + len(keep)].masked_fill_(~keep, IGNORE_INDEX)
            pos += len(keep)
            del keep
        labels[pos:] = IGNORE_INDEX
        self._fill = CHUNK_TOKENS
        return ids.view(-1, self.seq_len), labels.view(-1, self.seq_len)


# -- tokenizing a batch of texts ---------------------------------------------------------------------
Encode = Callable[[Sequence[str]], List[np.ndarray]]


def _is_fast_hf(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False)) and callable(tokenizer)


def _pieces(text: str) -> List[str]:
    """`text` cut about every PIECE_CHARS characters, before a space that follows a non-space character.

    Why: one 50 MB document is one item of a batch, and all of its encoding would be held at once. Such a cut
    leaves the ids unchanged for every tokenizer segments.segmentable admits (see there). Elsewhere, and where
    half a piece has no such space (text without spaces, e.g. Chinese), a cut can change the tokens next to
    it: a SentencePiece tokenizer that prefixes each input with "▁" (Llama 2's legacy one) adds a token there.
    """
    if len(text) <= PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        lo, hi = start + PIECE_CHARS // 2, start + PIECE_CHARS
        cut = text.rfind(" ", lo, hi)
        while cut > lo and text[cut - 1].isspace():
            cut = text.rfind(" ", lo, cut)
        if cut < 0 or text[cut - 1].isspace():
            cut = hi  # no safe cut: cut anywhere
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def text_encoder(tokenizer) -> Encode:
    """encode(texts) -> the ids of each text without special tokens, as int arrays; batched where the tokenizer
    can. Made once per file, so a fast tokenizer's segment cache (word_cache.py) serves the whole file."""
    if isinstance(tokenizer, ByteTokenizer):
        return lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    if not _is_fast_hf(tokenizer):
        return lambda texts: [np.asarray(tokenizer.encode(t, add_special_tokens=False), dtype=np.int32)
                              for t in texts]
    if segmentable(tokenizer):
        return functools.partial(_encode_in_pieces, SegmentEncoder(tokenizer))

    def call(batch: List[str]) -> List[np.ndarray]:
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int32) for ids in encoded]
    return functools.partial(_encode_in_pieces, call)


def _encode_in_pieces(call: Encode, texts: Sequence[str]) -> List[np.ndarray]:
    parts: List[List[np.ndarray]] = [[] for _ in texts]
    batch, owners, chars = [], [], 0

    def flush():
        # One call per ~PIECE_CHARS * 16 characters: enough to keep every core busy, while what one call holds
        # (the tokenizer's encodings, per-token Python lists) stays small.
        for i, ids in zip(owners, call(batch)):
            parts[i].append(ids)
        batch.clear()
        owners.clear()

    for i, t in enumerate(texts):
        for piece in _pieces(t):
            batch.append(piece)
            owners.append(i)
            chars += len(piece)
            if chars >= 16 * PIECE_CHARS:
                flush()
                chars = 0
    if batch:
        flush()
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def pack_documents(packer: TokenPacker, docs: Sequence[Tuple[Optional[str], str]], tokenizer,
                   encode: Optional[Encode] = None) -> None:
    """Append documents (prompt or None, text) as [bos] prompt text [eos]; bos and the prompt carry no loss.

    Prompt and text are tokenized separately (as TRL does) so the loss boundary is exact. The batch goes
    to the packer as one array: per-document appends cost more than the byte tokenizer's encoding.
    encode: text_encoder(tokenizer), made once for a whole file.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    bos_a = np.array([bos] if bos is not None else [], dtype=np.int32)
    eos_a = np.array([eos] if eos is not None else [], dtype=np.int32)
    prompts = [p for p, _ in docs if p is not None]
    encoded = (encode or text_encoder(tokenizer))(prompts + [t for _, t in docs])
    prompt_ids, text_ids = iter(encoded[:len(prompts)]), iter(encoded[len(prompts):])
    pieces, loss = [], []
    for prompt, _ in docs:
        pieces.append(bos_a)
        loss.append(False)
        if prompt is not None:
            pieces.append(next(prompt_ids))
            loss.append(False)
        pieces += [next(text_ids), eos_a]
        loss += [True, True]
    lengths = [len(p) for p in pieces]
    # int32 (the staging type): a 50 MB one-line document would be 400 MB as int64 here.
    packer.add(np.concatenate(pieces, dtype=np.int32), np.repeat(np.array(loss), lengths))


def pack(examples: Iterable[Tuple[Sequence[int], Sequence[int]]], seq_len: int,
         pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids, labels) documents and cut the stream into rows of seq_len (see TokenPacker).

    A label is either the token itself (it carries loss) or IGNORE_INDEX, as encode_record makes them.
    """
    packer = TokenPacker(seq_len, pad_id)
    for i, (ids, labels) in enumerate(examples):
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        if ids.shape != labels.shape or ids.ndim != 1:
            raise ValueError(f"pack: example {i} has {ids.shape} ids and {labels.shape} labels; equal 1-D "
                             "lengths are needed")
        loss = labels != IGNORE_INDEX
        if not np.array_equal(labels[loss], ids[loss]):
            raise ValueError(f"pack: example {i} has a label that is neither its token nor IGNORE_INDEX "
                             f"({IGNORE_INDEX}); labels are aligned with the ids (the loss shifts them)")
        packer.add(ids, loss)
    return packer.finish()
