"""Data loading: formats, response-only labels, packing, and errors that name the file and line."""
import json

import pytest
import torch

from lora_kernels.data import (DEMO_PATH, IGNORE_INDEX, ByteTokenizer, DataError, encode_record, load_packed, pack,
                               read_records, split_eval)

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
