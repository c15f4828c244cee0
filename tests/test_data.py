"""Data loading: formats, response-only labels, packing, per-rank batch order, and errors naming file and line."""
import json

import pytest
import torch

from lora_kernels.data import (DEMO_PATH, IGNORE_INDEX, ByteTokenizer, DataError, PackedDataset, ShardedBatches,
                               count_loss_tokens, encode_record, iter_records, load_packed, pack, read_records,
                               split_eval)

TOK = ByteTokenizer()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_prompt_response_loss_on_response_only(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "Q: hi\nA: ", "response": "yo"}),
                                         json.dumps({"text": "ab"})])
    recs = read_records(path)
    ids, labels = encode_record(recs[0], TOK)
    prompt_len = 1 + len("Q: hi\nA: ".encode())
    assert ids == [TOK.bos_token_id, *b"Q: hi\nA: ", *b"yo", TOK.eos_token_id]
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == [*b"yo", TOK.eos_token_id]
    ids, labels = encode_record(recs[1], TOK)
    assert labels == [IGNORE_INDEX, *b"ab", TOK.eos_token_id]
    assert recs[1].source.endswith("d.jsonl:2")


def test_plain_text_documents_split_on_blank_lines(tmp_path):
    path = _write(tmp_path / "t.txt", ["first line", "still first", "", "", "second"])
    recs = read_records(path)
    assert [r.text for r in recs] == ["first line\nstill first", "second"]
    assert all(r.prompt is None for r in recs)


def test_pack_fixed_length_pads_last_row_without_loss():
    ids, labels = pack([([1, 2, 3], [1, 2, 3]), ([4, 5], [IGNORE_INDEX, 5])], seq_len=4, pad_id=9)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 9, 9, 9]]
    assert labels.tolist() == [[1, 2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="seq_len"):
        pack([([1], [1])], seq_len=1, pad_id=0)


def test_demo_dataset_ships_both_formats():
    with open(DEMO_PATH, encoding="utf-8") as f:
        n_lines = sum(1 for line in f if line.strip())
    recs = read_records(DEMO_PATH)
    assert 200 <= n_lines == len(recs)
    assert any(r.prompt is not None for r in recs) and any(r.prompt is None for r in recs)
    ds = load_packed(DEMO_PATH, TOK, 128)
    assert ds.input_ids.shape[1] == 128 and len(ds) > 100
    assert 0 < ds.num_loss_tokens() < ds.input_ids.numel()
    train, ev = split_eval(ds, 0.05)
    assert len(train) + len(ev) == len(ds)
    assert not set(map(tuple, ev.input_ids.tolist())) & set(map(tuple, train.input_ids.tolist()))


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "only a prompt"}', "no 'response'"),
    ('{"prompt": "p", "response": 3}', "'response' must be a string"),
    ('{"prompt": "p", "response": ""}', "'response' is empty"),
    ('{"txt": "typo"}', "expected a 'text' key"),
    ('{"text": ""}', "'text' must be a non-empty string"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "", line])
    with pytest.raises(DataError, match=message) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert err.value.line == 3


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        read_records(str(path))


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        read_records(str(tmp_path))
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="contains no examples"):
        read_records(empty)


def test_byte_tokenizer_roundtrip(tmp_path):
    text = "LoRA — 低秩"
    assert TOK.decode(TOK.encode(text, add_special_tokens=True)) == text
    TOK.save_pretrained(str(tmp_path))
    assert ByteTokenizer.is_saved_in(str(tmp_path))
    assert ByteTokenizer.from_pretrained(str(tmp_path)).encode("a") == [97]
    assert torch.tensor(TOK.encode("x")).max() < TOK.vocab_size


def test_count_loss_tokens_skips_each_rows_first_label():
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    assert count_loss_tokens(labels) == 2
    assert PackedDataset(torch.zeros_like(labels), labels).num_loss_tokens() == 2


def _row_ids(batches, n):
    """The first column of each row read: the row's index, as the test dataset is built."""
    return [int(v) for _ in range(n) for v in batches.next()[0][:, 0]]


def test_sharded_batches_split_ranks_and_resume_from_cursor():
    ids = torch.arange(10).unsqueeze(1).repeat(1, 4)
    ds = PackedDataset(ids, ids.clone())
    ranks = [ShardedBatches(ds, batch_size=2, seed=3, rank=r, world=2) for r in range(2)]
    epoch0 = [_row_ids(b, 3) for b in ranks]  # 2 + 2 + 1 rows: one epoch of 5 rows per rank
    assert not set(epoch0[0]) & set(epoch0[1]) and len(set(epoch0[0]) | set(epoch0[1])) == 10
    full = ShardedBatches(ds, batch_size=2, seed=3)
    _row_ids(full, 4)
    resumed = ShardedBatches(ds, batch_size=2, seed=3)
    resumed.load_state(full.state())
    assert _row_ids(resumed, 6) == _row_ids(full, 6)  # across the epoch boundary too
    with pytest.raises(ValueError, match="fewer than the 20 processes"):
        ShardedBatches(ds, batch_size=2, seed=3, rank=0, world=20)


@pytest.mark.parametrize("name", ["zeros.txt", "zeros.jsonl"])
def test_file_of_nul_bytes_is_refused_naming_file_line_and_offset(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(DataError, match=r"NUL byte at byte offset 0 of the file: this is binary data") as err:
        load_packed(str(path), TOK, 16)
    assert str(err.value).startswith(f"{path}:1: ")


def test_nul_byte_after_text_names_its_line_and_offset(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"good text\n\nmore\x00\x01\x02 binary\n")
    with pytest.raises(DataError, match=rf"{path}:3: NUL byte at byte offset 15 of the file"):
        read_records(str(path))


def test_records_are_read_lazily(tmp_path):
    """The first record is available before a bad line further down is even read."""
    path = _write(tmp_path / "d.jsonl", [json.dumps({"text": "first"}), "{broken"])
    records = iter_records(path)
    assert next(records).text == "first"
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        next(records)


def test_load_packed_working_memory_is_a_few_bytes_per_token(tmp_path):
    """Streaming: the loader never holds every record or Python lists of every token.

    tracemalloc sees Python objects and numpy buffers but not torch's allocator, so the peak it reports is
    the loader's working memory beyond the packed tensors (its result): with streaming, ~5 bytes a token of
    int32+flag staging plus one batch of text; with whole-file lists, over 16 (two 8-byte pointers a token).
    """
    import tracemalloc

    words = "the adapter trains a low rank update of the frozen weight".split()
    para = "\n".join(" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(5))
    path = tmp_path / "big.txt"
    path.write_text((para + "\n\n") * 25_000, encoding="utf-8")  # ~8 MB
    tracemalloc.start()
    try:
        ds = load_packed(str(path), TOK, 256, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = ds.input_ids.numel()
    assert tokens > 7_000_000
    assert peak / tokens < 10, f"{peak / tokens:.1f} bytes per token"


def _wordlevel_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for t in texts:
        for w in t.split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("which", ["byte", "fast"])
def test_streamed_packing_equals_packing_every_encoded_record(tmp_path, monkeypatch, which):
    """Small batches, staging chunks and pieces, so every boundary is crossed: the same rows as encode_record
    + pack over the whole list, for the byte tokenizer and a fast HF tokenizer (batch-encoded in pieces)."""
    from lora_kernels.data import loader, packing

    long_doc = " ".join(f"w{i % 37}" for i in range(3000))  # several pieces
    lines = [json.dumps({"text": long_doc})] + [line for line in open(DEMO_PATH, encoding="utf-8")][:60]
    path = _write(tmp_path / "mix.jsonl", [line.rstrip("\n") for line in lines])
    records = read_records(path)
    tok = TOK if which == "byte" else _wordlevel_tokenizer(
        [r.text for r in records] + [r.prompt for r in records if r.prompt])
    expected = pack((encode_record(r, tok) for r in records), 16, tok.pad_token_id)
    monkeypatch.setattr(loader, "BATCH_CHARS", 500)
    monkeypatch.setattr(packing, "CHUNK_TOKENS", 37)
    monkeypatch.setattr(packing, "PIECE_CHARS", 64)
    ds = load_packed(path, tok, 16)
    assert torch.equal(ds.input_ids, expected[0]) and torch.equal(ds.labels, expected[1])


def test_pack_refuses_labels_that_are_not_the_tokens():
    with pytest.raises(ValueError, match="neither its token nor IGNORE_INDEX"):
        pack([([1, 2, 3], [1, 7, 3])], seq_len=4, pad_id=0)


def test_loading_bar_reports_the_whole_file(tmp_path, monkeypatch, capsys):
    from lora_kernels.data import progress

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    path = _write(tmp_path / "bar.txt", ["some text"] * 100)
    load_packed(path, TOK, 16, progress=True)
    err = capsys.readouterr().err
    assert "loading bar.txt" in err and "100%" in err
    load_packed(path, TOK, 16, progress=False)
    assert "loading" not in capsys.readouterr().err


def test_split_eval_in_place_gives_the_same_rows_without_copying_them(monkeypatch):
    from lora_kernels.data import loader

    monkeypatch.setattr(loader, "COMPACT_ROWS", 7)  # many blocks, so a block overwriting a later source shows
    ids = torch.arange(1000 * 4).view(1000, 4)
    full = PackedDataset(ids, -ids)
    want_train, want_eval = split_eval(full, 0.1, seed=5)
    base = PackedDataset(ids.clone(), -ids.clone())
    train, ev = split_eval(base, 0.1, seed=5, in_place=True)
    assert torch.equal(train.input_ids, want_train.input_ids) and torch.equal(train.labels, want_train.labels)
    assert torch.equal(ev.input_ids, want_eval.input_ids) and torch.equal(ev.labels, want_eval.labels)
    assert train.input_ids.data_ptr() == base.input_ids.data_ptr()  # a view: no copy of the training rows
