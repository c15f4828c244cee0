"""A byte-level tokenizer for the built-in tiny model: ids 0..255 are the UTF-8 bytes, then a few specials.

It needs no vocabulary file and no download, and it mimics the slice of the Hugging Face tokenizer API
that the data loader and the CLI use (encode/decode, the special ids, save_pretrained/from_pretrained),
so the loader treats it and an AutoTokenizer alike.
"""
from __future__ import annotations

import json
import os
from typing import List

TOKENIZER_FILE = "byte_tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes as token ids; <pad>=256, <bos>=257, <eos>=258."""

    def __init__(self):
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258
        self.vocab_size = 256 + len(SPECIALS)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            out, buf = [], []
            for i in ids:
                if i < 256:
                    buf.append(i)
                else:
                    out.append(bytes(buf).decode("utf-8", errors="replace"))
                    buf = []
                    out.append(SPECIALS[i - 256])
            out.append(bytes(buf).decode("utf-8", errors="replace"))
            return "".join(out)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump({"type": "byte", "specials": list(SPECIALS)}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> "ByteTokenizer":
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("type") != "byte" or tuple(meta.get("specials", ())) != SPECIALS:
            raise ValueError(f"{path}: not a lora_kernels byte tokenizer (got {meta!r})")
        return cls()

    @staticmethod
    def is_saved_in(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, TOKENIZER_FILE))
