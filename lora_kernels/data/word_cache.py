"""Encoding large text with a fast Hugging Face tokenizer by distinct words: each one goes through the tokenizer once.

Why: the Rust tokenizer costs about 1 µs of CPU per character (its pre-tokenizer regex and per-byte offset
bookkeeping): ~45 s for 50 MB of English on the 2-core machine this was measured on, against the target of a
50 MB file ready to train in 30 s. Natural text repeats a few hundred thousand distinct words, so the text is cut
before every space that follows a non-space character (a "segment" is then ` word,` or ` end.\\nNext`), each
distinct segment is encoded once (kept across batches, up to CACHE_SEGMENTS), and a document's ids are gathered
from that cache with numpy.

Exact, not approximate: the ids equal tokenizer(text, add_special_tokens=False)["input_ids"] when no token
can span such a cut. `segmentable` admits only tokenizers for which that holds:
  - pre-tokenizers that split there and never join a non-space character to the space after it: ByteLevel with
    its GPT-2 regex (GPT-2, RoBERTa), the Llama 3 / Qwen2 split regexes followed by ByteLevel without regex,
    Metaspace(split=True) (a segment starts with "▁", so no prefix is added to it), Whitespace, WhitespaceSplit,
    BertPreTokenizer; optionally with Digits;
  - normalizers that map each character on its own: NFC/NFD/NFKC/NFKD, Lowercase, StripAccents,
    BertNormalizer (not Prepend, as in Llama 2's legacy tokenizer, nor Replace, nor Precompiled);
  - added tokens without whitespace in them and without rstrip (which would swallow the space after them);
  - no BPE dropout (the same word must always give the same ids), no truncation or padding set on the backend.
Other fast tokenizers are called on the text itself (packing.text_encoder).
"""
from __future__ import annotations

import json
import re
from itertools import chain, islice, repeat
from typing import List, Optional, Sequence, Tuple

import numpy as np

CACHE_SEGMENTS = 1 << 19  # distinct segments kept (~100 MB at most); the cache restarts when full
GROUP_SEGMENTS = 4096     # new segments per tokenizer input
# Python's \S is "not str.isspace()", and isspace() is true for every Unicode White_Space character (and a few
# more): no cut follows a tab, a newline or a no-break space.
CUT = re.compile(r"(?<=\S) ")
SPACE_AFTER_SPACE = re.compile(r"\s ")  # without one, every space but a leading one is a cut: str.split does it

# The split regexes of Llama 3 (digits in threes) and Qwen2 (single digits): no alternative matches a non-space
# character followed by a space, so a match never crosses a cut.
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_LOCAL_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer"}


def _splits_at_spaces(p: dict) -> bool:
    kind = p.get("type")
    if kind == "ByteLevel":
        return bool(p.get("use_regex", True))
    if kind == "Metaspace":
        return bool(p.get("split", True))
    if kind == "Split":
        return (p.get("pattern", {}).get("Regex") in _SPLIT_PATTERNS and p.get("behavior") == "Isolated"
                and not p.get("invert", False))
    return kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer")


def _keeps_splits(p: dict) -> bool:
    """Works within each piece it is given (so it sees the same pieces either way)."""
    if p.get("type") == "ByteLevel":
        return not p.get("add_prefix_space", False)
    return p.get("type") == "Digits"


def segmentable(tokenizer) -> bool:
    """Whether SegmentEncoder gives exactly tokenizer(text, add_special_tokens=False)'s ids (see the module doc)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return False
    if backend.truncation is not None or backend.padding is not None or getattr(backend.model, "dropout", None):
        return False
    if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return False
    if backend.pre_tokenizer is None:
        return False
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if not any(_splits_at_spaces(p) for p in steps):
        return False
    if not all(_splits_at_spaces(p) or _keeps_splits(p) for p in steps):
        return False
    if backend.normalizer is not None:
        norm = json.loads(backend.normalizer.__getstate__())
        norms = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
        if not all(n.get("type") in _LOCAL_NORMALIZERS for n in norms):
            return False
    return all(not tok.rstrip and not any(c.isspace() for c in tok.content)
               for tok in backend.get_added_tokens_decoder().values())


class SegmentEncoder:
    """encoder(texts) -> the ids of each text (int32 arrays), as the tokenizer gives them, with each distinct
    segment encoded once. Only for tokenizers that `segmentable` admits."""

    def __init__(self, tokenizer):
        self._backend = tokenizer._tokenizer
        self._sep = _separator(self._backend)
        self._clear()

    def _clear(self) -> None:
        self._index = {}                           # segment (without its leading space) -> its number
        self._heads = {}                           # a text's first segment -> its ids
        self._store = np.zeros(0, dtype=np.int32)  # the ids of every cached segment, end to end
        self._starts = np.zeros(0, dtype=np.int64)
        self._lens = np.zeros(0, dtype=np.int64)

    def __call__(self, texts: Sequence[str]) -> List[np.ndarray]:
        if len(self._index) + len(self._heads) >= CACHE_SEGMENTS:
            self._clear()
        split = [CUT.split(t) if SPACE_AFTER_SPACE.search(t) else t.split(" ") for t in texts]
        head_ids = self._encode_heads([s[0] for s in split])
        tails = list(chain.from_iterable(islice(s, 1, None) for s in split))
        units = np.fromiter(map(self._index.get, tails, repeat(-1)), dtype=np.int64, count=len(tails))
        missing = np.flatnonzero(units < 0)
        if len(missing):
            missed = [tails[i] for i in missing]
            new = list(dict.fromkeys(missed))
            flat, lens = self._encode_spaced(new)
            self._starts = np.concatenate([self._starts, len(self._store) + _exclusive_cumsum(lens)])
            self._lens = np.concatenate([self._lens, lens])
            self._store = np.concatenate([self._store, flat])
            self._index.update(zip(new, range(len(self._index), len(self._index) + len(new))))
            units[missing] = np.fromiter(map(self._index.__getitem__, missed), dtype=np.int64, count=len(missed))
        del tails
        # The tail tokens of every text, end to end: segment k's ids are store[starts[k]:starts[k] + lens[k]].
        unit_lens = self._lens[units]
        pos = np.repeat(self._starts[units] - _exclusive_cumsum(unit_lens), unit_lens)
        pos += np.arange(len(pos))
        tail_ids = self._store[pos]
        token_bounds = np.concatenate([[0], np.cumsum(unit_lens)])
        tail_bounds = token_bounds[np.concatenate([[0], np.cumsum([len(s) - 1 for s in split])])]
        return [np.concatenate([head_ids[i], tail_ids[tail_bounds[i]:tail_bounds[i + 1]]]) for i in range(len(texts))]

    def _encode_heads(self, heads: List[str]) -> List[np.ndarray]:
        """The ids of each text's first segment, which has no cut space before it: encoded as it is."""
        new = [h for h in dict.fromkeys(heads) if h not in self._heads]
        if new:
            encoded = self._backend.encode_batch_fast(new, add_special_tokens=False)
            self._heads.update((h, np.asarray(e.ids, dtype=np.int32)) for h, e in zip(new, encoded))
        return [self._heads[h] for h in heads]

    def _encode_spaced(self, segments: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids end to end, ids per segment) of " " + each segment.

        Encoding each segment as its own input costs ~20 µs apiece in the tokenizer, more than its characters
        do; so segments go in joined into a few long inputs with a special token between them, which splits
        the input before normalization (so the pieces are encoded on their own), and whose id marks the
        boundaries. A text that holds that token itself gives extra marks: that input is encoded one
        segment at a time instead.
        """
        groups = [segments[i:i + GROUP_SEGMENTS] for i in range(0, len(segments), GROUP_SEGMENTS)]
        if self._sep is None:
            return self._encode_one_by_one(segments)
        sep, sep_id = self._sep
        joined = [sep.join(" " + s for s in g) for g in groups]
        encoded = self._backend.encode_batch_fast(joined, add_special_tokens=False)
        flats, lens = [], []
        for group, text, enc in zip(groups, joined, encoded):
            ids = np.asarray(enc.ids, dtype=np.int32)
            marks = np.flatnonzero(ids == sep_id)
            if len(marks) != len(group) - 1 or text.count(sep) != len(group) - 1:
                f, n = self._encode_one_by_one(group)
            else:
                f = np.delete(ids, marks)
                n = np.diff(np.concatenate([[-1], marks, [len(ids)]])) - 1
            flats.append(f)
            lens.append(n)
        return np.concatenate(flats), np.concatenate(lens).astype(np.int64)

    def _encode_one_by_one(self, segments: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in self._backend.encode_batch_fast([" " + s for s in segments], add_special_tokens=False)]
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum())), lens


def _separator(backend) -> Optional[Tuple[str, int]]:
    """A special token that the backend matches as a whole in raw text and that takes no space with it."""
    if backend.encode_special_tokens:  # special tokens in the text are tokenized as text
        return None
    usable = [(len(tok.content), tid, tok.content) for tid, tok in backend.get_added_tokens_decoder().items()
              if tok.special and tok.content and not (tok.lstrip or tok.rstrip or tok.single_word or tok.normalized)]
    if not usable:
        return None
    _, tid, content = min(usable)  # the shortest: it is matched once per segment
    return content, tid


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), dtype=np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out
