"""Encoding by distinct segments (lora_kernels/data/word_cache.py) gives exactly the tokenizer's own ids."""
import json

import numpy as np
import pytest
import torch

from lora_kernels.data import DEMO_PATH, encode_record, load_packed, pack, read_records
from lora_kernels.data import packing, word_cache
from lora_kernels.data.word_cache import SegmentEncoder, segmentable

# Every kind of whitespace next to every kind of character: where a cut would be unsafe, a wrong cut shows.
TRICKY = [
    "  two leading spaces, then  two  inside and a trailing one ",
    "code:\n    if x:\n        return  x   +  1\n    return    0   ",
    "tab\tbefore and after\t word\t\tend\t",
    "lines\nand\n  indented\n\tlines\r\nwith CRLF \r\n and a space after a newline \n",
    "no-break\u00a0space \u00a0 ideographic\u3000space \u3000x em\u2003space",
    "it's we'll they'd I'M 1234567 3.14159 -42 (parens) [brackets] {braces} a.\n.b ...\n\n",
    "中文没有空格的句子很长 日本語の文 한국어 문장 emoji 😀👍🏽 mixed😀word",
    "café naïve Ünïcödé ﬁ ligature ½ ² x\u0308 combining",
    "<|eos|> a literal special token <|eos|>x y<|eos|> and <s> the shortest <s>x",
    "",
    " ",
    "word",
]


def _corpus():
    texts = [r.text for r in read_records(DEMO_PATH)] + [r.prompt for r in read_records(DEMO_PATH) if r.prompt]
    return texts + TRICKY


# Training only: runs of spaces common enough that the vocabulary merges them ("ĠĠĠ"), as code-trained ones do.
INDENTED = ["def f(x):\n    if x:\n        return  x   +  1\n    return    0"] * 20


def _fast(kind):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|eos|>", "<s>", "<pad>", "<unk>"]
    if kind == "bytelevel":  # GPT-2 / RoBERTa
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "llama3":  # Llama 3's split regex, then bytes
        tok = Tokenizer(models.BPE())
        pattern = next(p for p in word_cache._SPLIT_PATTERNS if "{1,3}" in p)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind in ("metaspace", "legacy"):  # Llama 2 style: current conversion, and the legacy normalizer one
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        if kind == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        else:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        specials += [f"<0x{i:02X}>" for i in range(256)]
        alphabet = []
    else:
        raise ValueError(kind)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(_corpus() + INDENTED, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", bos_token="<s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["bytelevel", "llama3", "metaspace"])
def fast(request):
    return _fast(request.param)


def test_segment_ids_equal_the_tokenizers_own(fast, monkeypatch):
    """Tricky whitespace, a text holding the separator token (that group is encoded one by one), the cache
    reused across calls and restarted when full, small groups: always tokenizer(text)'s ids."""
    assert segmentable(fast)
    monkeypatch.setattr(word_cache, "GROUP_SEGMENTS", 7)
    texts = _corpus()
    want = [fast(t, add_special_tokens=False)["input_ids"] for t in texts]
    enc = SegmentEncoder(fast)
    for half in (texts[: len(texts) // 2], texts[len(texts) // 2:], texts):  # the last call is all cache hits
        got = enc(half)
        assert [list(g) for g in got] == [w for w, t in zip(want, texts) if t in half]
        assert all(g.dtype == np.int32 for g in got)
    monkeypatch.setattr(word_cache, "CACHE_SEGMENTS", 5)
    assert [list(g) for g in enc(texts)] == want and [list(g) for g in enc(texts)] == want


def test_one_line_file_cut_into_pieces_packs_the_same_rows(fast, tmp_path, monkeypatch):
    """A one-line text file (one document) cut into many pieces, with small batches and staging chunks:
    the rows of encode_record + pack over the whole document, for a fast tokenizer with segments."""
    text = " ".join(_corpus()).replace("\n", " ").replace("\r", " ")  # one line, with runs of spaces and tabs
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    (record,) = read_records(str(path))
    want = pack([encode_record(record, fast)], 16, fast.pad_token_id)
    monkeypatch.setattr(packing, "PIECE_CHARS", 64)
    monkeypatch.setattr(packing, "CHUNK_TOKENS", 37)
    pieces = packing._pieces(text)
    assert len(pieces) > 100 and all(p.startswith(" ") for p in pieces[1:])  # every cut a safe one
    assert isinstance(packing.text_encoder(fast).args[0], SegmentEncoder)  # the path load_packed takes
    ds = load_packed(str(path), fast, 16)
    assert torch.equal(ds.input_ids, want[0]) and torch.equal(ds.labels, want[1])


def test_segmentable_refuses_tokenizers_a_cut_can_change():
    """Llama 2's legacy normalizer prefixes "▁" to each input; an rstrip token swallows the space after it;
    BPE dropout is random. Those go through tokenizer(text), and a file of short documents packs the same."""
    from tokenizers import AddedToken, normalizers

    legacy = _fast("legacy")
    assert not segmentable(legacy)
    prepend = _fast("metaspace")
    prepend._tokenizer.normalizer = normalizers.Prepend("▁")
    assert not segmentable(prepend)
    ok = _fast("bytelevel")
    assert segmentable(ok)
    ok._tokenizer.add_special_tokens([AddedToken("<sep>", rstrip=True)])
    assert not segmentable(ok)
    dropout = _fast("bytelevel")
    dropout._tokenizer.model.dropout = 0.1
    assert not segmentable(dropout)
    docs = [json.dumps({"text": t}) for t in TRICKY if t.strip()]
    want = [legacy(t, add_special_tokens=False)["input_ids"] for t in TRICKY if t.strip()]
    got = packing.text_encoder(legacy)([t for t in TRICKY if t.strip()])
    assert [list(g) for g in got] == want and len(docs) == len(want)


def test_pieces_cut_only_before_a_space_after_a_non_space(monkeypatch):
    monkeypatch.setattr(packing, "PIECE_CHARS", 8)
    text = "ab cd  ef\n gh ij   kl mn\t op qr"
    pieces = packing._pieces(text)
    assert "".join(pieces) == text and len(pieces) > 1
    for left, right in zip(pieces, pieces[1:]):
        assert right.startswith(" ") and not left[-1].isspace()
