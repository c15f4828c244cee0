"""Data loading: formats, response-only labels, packing, per-rank batch order, and errors naming file and line."""
import json

import pytest
import torch

from lora_kernels.data import (DEMO_PATH, IGNORE_INDEX, ByteTokenizer, DataError, PackedDataset, ShardedBatches,
                               count_loss_tokens, encode_record, load_packed, pack, read_records, split_eval)

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
