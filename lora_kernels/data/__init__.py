"""Training data: local JSONL / text loaders (loader.py), streaming tokenization and packing (packing.py), a fast
Hugging Face tokenizer's encoding by distinct segments (word_cache.py), the loading bar (progress.py), the per-rank
batch order (batches.py), the byte tokenizer, the demo set.

demo.jsonl (DEMO_PATH) is a small English set written for this package: short prose about LoRA and
training ({"text"} lines) and templated question/answer pairs ({"prompt", "response"} lines), enough
for the built-in tiny model to show a falling loss within a couple of minutes on a laptop CPU.
"""
from .batches import ShardedBatches
from .loader import (DEMO_PATH, IGNORE_INDEX, DataError, PackedDataset, Record, check_data_file, count_loss_tokens,
                     encode_record, iter_records, load_packed, read_records, split_eval)
from .packing import TokenPacker, pack
from .tokenizer import ByteTokenizer

__all__ = ["DEMO_PATH", "IGNORE_INDEX", "ByteTokenizer", "DataError", "PackedDataset", "Record", "ShardedBatches",
           "TokenPacker", "check_data_file", "count_loss_tokens", "encode_record", "iter_records", "load_packed", "pack", "read_records",
           "split_eval"]
