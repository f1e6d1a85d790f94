"""Corpus inputs for the scoring stage: read records, encode them into ids with targets and labels, split windows.

    records (JSONL / JSON / Parquet / CSV / HF dataset)  --iter_records-->  Record(kind = text | chat | completion | error)
      --encode_record-->  Encoded(input_ids, loss_mask, label, text, char_start, char_end, layout)
      --split_windows-->  [Window]  (one shard row each; see docs/design.md "The shard contract")

    readers.py   check_inputs, the per-format readers, iter_records, Record / FieldNames, derived ids, InputError
    encoding.py  encode_record: targets (docs/design.md "Targets"), chat masks, spans → labels
    windows.py   split_windows, window_slice
    layout.py    Layout (how `text` was built, stored in shards) and record_from_layout (the record back, for `tokenprio project`)

The names below are the public API; import them from `scoring.inputs`.
"""

from scoring.inputs.encoding import Encoded, encode_record
from scoring.inputs.layout import Layout, record_from_layout
from scoring.inputs.readers import FILE_EXTENSIONS, FieldNames, InputError, Record, check_inputs, input_problem, iter_records, where
from scoring.inputs.windows import Window, split_windows, window_slice

__all__ = [
    "FILE_EXTENSIONS",
    "Encoded",
    "FieldNames",
    "InputError",
    "Layout",
    "Record",
    "Window",
    "check_inputs",
    "encode_record",
    "input_problem",
    "iter_records",
    "record_from_layout",
    "split_windows",
    "where",
    "window_slice",
]
