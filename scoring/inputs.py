"""Corpus inputs for the scoring stage: read records, encode them into ids with targets and labels, split windows.

    records (JSONL / JSON / Parquet / CSV / HF dataset)  --iter_records-->  Record(kind = text | chat | completion | error)
      --encode_record-->  Encoded(input_ids, loss_mask, label, text, char_start, char_end)
      --split_windows-->  [Window]  (one shard row each; see DESIGN.md "The shard contract")

Targets (DESIGN.md "Targets"): position t describes the prediction of token t, so position 0 is never a
target. Plain text: every text token plus an appended EOS. Prompt/completion: completion tokens plus EOS.
Chat: assistant content plus the end-of-turn token that closes it, never role headers. `char_start` /
`char_end` index `text` (Python str indices); tokens with no characters in `text` (a BOS added by the
tokenizer's post-processor, the appended EOS) have -1 and never take a label.

A bad record never stops `iter_records`: it becomes a Record of kind "error" so record numbering (and hence
shard k = records [kR, (k+1)R)) does not depend on what is wrong with the data. `encode_record` raises
InputError; the caller decides whether to stop or skip.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# What a 1-based `Record.line` counts, by source: lines of the file, items of a JSON list, rows of a table.
POSITION_WORD = {".jsonl": "line", ".csv": "line", ".json": "item", ".parquet": "row"}
DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gsm8k" or "openai/gsm8k"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects {% generation %}
FIELD_OPTIONS = "--text-field, --messages-field, --prompt-field and --completion-field"
PARQUET_BATCH_ROWS = 1024  # rows decoded to Python at a time


class InputError(ValueError):
    """A bad input or record; the message names the source file (or dataset), the 1-based line/row, the field, and the fix."""


@dataclass(frozen=True)
class FieldNames:
    text: str = "text"  # plain text records
    messages: str = "messages"  # chat records: a list of {role, content}
    prompt: str = "prompt"  # prompt/completion records (with `completion`)
    completion: str = "completion"
    id: str = "id"  # optional record id (string or integer); derived when absent
    spans: str = "spans"  # optional list of {start, end, label[, message]} character spans


@dataclass(frozen=True)
class Record:
    source: str  # file path or HF dataset name, as given
    line: int  # 1-based line (JSONL/CSV) or item/row index (JSON/Parquet/dataset)
    doc_id: str  # given id, else derived from source name + line + content (sha256 prefix)
    kind: str  # "text" | "chat" | "completion" | "error"
    data: dict  # the raw record ({} when it could not be parsed)
    error: str | None  # kind == "error": the full message
    fields: FieldNames = field(default_factory=FieldNames)  # the field names `data` was read with


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # targets; position 0 is never one
    label: list[str | None]  # span label per token, None where none
    text: str  # the rendered text that char offsets index
    char_start: list[int]  # Python str index into `text`, -1 for tokens with no characters there
    char_end: list[int]


@dataclass(frozen=True)
class Window:
    window: int  # index within the record
    n_context: int  # leading tokens repeated from window - 1 (never targets); 0 for window 0
    input_ids: list[int]
    loss_mask: list[bool]
    label: list[str | None]
    char_start: list[int]
    char_end: list[int]


def where(source: str, line: int) -> str:
    """`data/x.jsonl, line 3` / `data/x.parquet, row 3` / `gsm8k, row 3`: how messages name a record."""
    return f"{source}, {POSITION_WORD.get(Path(source).suffix.lower(), 'row')} {line}"


# ----------------------------------------------------------------------------------------------
# Checking inputs up front


def is_dataset_folder(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def input_problem(name: str) -> str | None:
    """What is wrong with one input (None if nothing): a missing file, an unknown extension, a bad dataset name."""
    path = Path(name)
    suffix = path.suffix.lower()
    if path.is_dir():
        if is_dataset_folder(path):
            return None
        return f"{name}: a folder but not a dataset saved with datasets' save_to_disk; pass its files ({', '.join(FILE_EXTENSIONS)}) instead."
    if path.is_file():
        if suffix in FILE_EXTENSIONS:
            return parquet_problem(path) if suffix == ".parquet" else None
        return f"{name}: unknown extension {suffix or '(none)'!r}; use one of {', '.join(FILE_EXTENSIONS)} or a dataset name."
    if suffix in FILE_EXTENSIONS:
        return f"{name}: no such file; check the path."
    # An alphabetic suffix (".txt") means a file was meant; dataset names may hold dots ("v1.2").
    if re.fullmatch(r"\.[a-z]+", suffix):
        return f"{name}: no such file, and unknown extension {suffix!r}; use one of {', '.join(FILE_EXTENSIONS)}."
    if not DATASET_NAME.match(name):
        return f"{name}: no such file or folder, and not a dataset name (NAME or OWNER/NAME); check the path."
    return None


def parquet_problem(path: Path) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).close()
    except (pa.ArrowInvalid, OSError) as error:
        return f"{path}: not a readable Parquet file ({error}); rewrite it with pandas.DataFrame.to_parquet."
    return None


def check_inputs(inputs: list[str]) -> None:
    """Raise one InputError listing every input that is missing, has an unknown extension or is not a dataset name.

    Files: .jsonl, .json (a list of objects), .parquet, .csv. Folders: written by `save_to_disk`. Anything
    else that looks like NAME or OWNER/NAME is taken as a Hugging Face dataset name (loaded when read).
    """
    if not inputs:
        raise InputError(f"no inputs given; pass {', '.join(FILE_EXTENSIONS)} files, dataset folders or dataset names.")
    problems = [problem for problem in map(input_problem, inputs) if problem is not None]
    if problems:
        raise InputError("\n".join(problems))


# ----------------------------------------------------------------------------------------------
# Reading records
#
# Each reader yields (line, data, error, raw): the 1-based position, the parsed dict (or None), an error
# message (or None) and the raw text the derived id of an unparsable record is computed from.


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Stream a JSONL file line by line; blank lines are skipped (they hold no record)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield line_no, None, f"invalid UTF-8 at byte {error.start} of the line; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).", raw.hex()
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                yield line_no, None, f"malformed JSON at column {error.colno} ({error.msg}); fix or remove the line (one JSON object per line).", line
                continue
            if not isinstance(data, dict):
                yield line_no, None, f"expected a JSON object, got {type(data).__name__}; write one object per line.", line
                continue
            yield line_no, data, None, line


def read_json(path: Path) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """A .json file holds one list of objects; it is read whole (a JSON array cannot be streamed by line)."""
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: invalid UTF-8 at byte {error.start}; re-encode the file as UTF-8.") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno} ({error.msg}); fix the file.") from None
    if not isinstance(items, list):
        raise InputError(f"{path}: a .json input must hold a list of objects, got {type(items).__name__}; for one object per line use .jsonl.")
    for index, item in enumerate(items, start=1):
        if isinstance(item, dict):
            yield index, item, None, ""
        else:
            yield index, None, f"expected a JSON object, got {type(item).__name__}; the list must hold objects.", json.dumps(item, default=str)


def read_parquet(path: Path) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Stream a Parquet file in batches of rows; row numbers are 1-based."""
    import pyarrow.parquet as pq

    row_no = 0
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row, None, ""


def decoded_lines(raw_lines, bad_lines: set[int]) -> Iterator[str]:
    """Decode lines as UTF-8 for the csv module, remembering (1-based) lines that are not valid UTF-8."""
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError:
            bad_lines.add(line_no)
            yield raw.decode("utf-8", errors="replace")


def read_csv(path: Path, fields: FieldNames) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Stream a CSV file with a header row. `line` is the file line where the row starts (header = line 1).

    CSV cells are strings, so the `messages` and `spans` cells are decoded as JSON. An empty cell counts as
    absent (as pandas reads it), so one file may mix kinds in columns left empty where unused.
    """
    # The csv module refuses cells over 128 KiB by default; one document per cell can be longer.
    csv.field_size_limit(2**31 - 1)
    bad_lines: set[int] = set()
    with open(path, "rb") as f:
        reader = csv.reader(decoded_lines(f, bad_lines))
        header, last_line = None, 0
        try:
            for row in reader:
                first_line, last_line = last_line + 1, reader.line_num
                if header is None:
                    header = row
                    continue
                if not row:
                    continue
                raw = ",".join(row)
                bad = sorted(bad_lines.intersection(range(first_line, last_line + 1)))
                if bad:
                    yield first_line, None, f"invalid UTF-8 on line {bad[0]}; re-encode the file as UTF-8.", raw
                elif len(row) != len(header):
                    yield first_line, None, f"{len(row)} cells but the header has {len(header)}; quote cells that hold commas.", raw
                else:
                    yield (first_line, *csv_record(dict(zip(header, row)), fields), raw)
        except csv.Error as error:
            raise InputError(f"{path}, line {reader.line_num}: unreadable CSV ({error}); fix the quoting.") from None


def csv_record(data: dict, fields: FieldNames) -> tuple[dict | None, str | None]:
    data = {name: value for name, value in data.items() if value != ""}
    for name in (fields.messages, fields.spans):
        if name in data:
            try:
                data[name] = json.loads(data[name])
            except json.JSONDecodeError as error:
                return None, f"field {name!r} is not valid JSON ({error.msg}); CSV cells of {name!r} must hold JSON."
    return data, None


def read_dataset(name: str, split: str) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Rows of a Hugging Face dataset: a folder saved with save_to_disk, or a name `load_dataset` resolves."""
    import datasets

    if Path(name).is_dir():
        dataset = datasets.load_from_disk(name)
    else:
        try:
            dataset = datasets.load_dataset(name, split=split)
        except (FileNotFoundError, ConnectionError, ValueError) as error:
            raise InputError(
                f"{name}: could not load dataset split {split!r} ({error}); no network here: pass a local file or a folder saved with save_to_disk."
            ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise InputError(f"{name}: no split {split!r} (found {sorted(dataset)}); pass --split.")
        dataset = dataset[split]
    for row_no, row in enumerate(dataset, start=1):
        yield row_no, row, None, ""


def raw_rows(name: str, fields: FieldNames, split: str) -> Iterator[tuple[int, dict | None, str | None, str]]:
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in FILE_EXTENSIONS and not path.exists():
        raise InputError(f"{name}: no such file; check the path.")
    if path.is_file() and suffix == ".jsonl":
        return read_jsonl(path)
    if path.is_file() and suffix == ".json":
        return read_json(path)
    if path.is_file() and suffix == ".parquet":
        return read_parquet(path)
    if path.is_file() and suffix == ".csv":
        return read_csv(path, fields)
    return read_dataset(name, split)


def derive_doc_id(source: str, line: int, content: str) -> str:
    """sha256(file name, line, content)[:16]: stable across machines and folders, unique unless a file is duplicated."""
    return hashlib.sha256(f"{Path(source).name}\n{line}\n{content}".encode()).hexdigest()[:16]


def record_kind(data: dict, fields: FieldNames) -> str | None:
    """chat if `messages` is set, else completion if `prompt` and `completion` are, else text if `text` is."""
    def present(name: str) -> bool:
        return data.get(name) is not None

    if present(fields.messages):
        return "chat"
    if present(fields.prompt) and present(fields.completion):
        return "completion"
    if present(fields.text):
        return "text"
    return None


def make_record(source: str, line: int, data: dict | None, error: str | None, raw: str, fields: FieldNames) -> Record:
    """Classify one parsed row; any problem becomes an error record carrying the full message."""
    if data is None:
        return Record(source, line, derive_doc_id(source, line, raw), "error", {}, f"{where(source, line)}: {error}", fields)
    content = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    doc_id = derive_doc_id(source, line, content)
    given = data.get(fields.id)
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (str, int)) or given == "":
            message = f"{where(source, line)}: field {fields.id!r} must be a non-empty string or integer, got {given!r}; fix it or pass --id-field."
            return Record(source, line, doc_id, "error", data, message, fields)
        doc_id = str(given)
    kind = record_kind(data, fields)
    if kind is None:
        message = (
            f"{where(source, line)}: the record matches no input kind: it needs {fields.text!r} (text), {fields.messages!r} (chat) "
            f"or {fields.prompt!r} and {fields.completion!r} (completion), but has fields {sorted(data)}; "
            f"name the fields with {FIELD_OPTIONS}."
        )
        return Record(source, line, doc_id, "error", data, message, fields)
    return Record(source, line, doc_id, kind, data, None, fields)


def iter_records(inputs: list[str], fields: FieldNames, *, split: str = "train") -> Iterator[Record]:
    """Every record of `inputs`, in order, streamed (JSONL/CSV by line, Parquet by batch; .json is read whole).

    A bad record (malformed JSON, invalid UTF-8, no matching kind, bad id) is yielded as kind "error" with
    its message instead of raising, so numbering stays stable. A file that cannot be read at all raises
    InputError. `split` selects the split of dataset inputs.
    """
    for name in inputs:
        for line, data, error, raw in raw_rows(name, fields, split):
            yield make_record(name, line, data, error, raw, fields)


# ----------------------------------------------------------------------------------------------
# Encoding: ids, targets, character offsets and labels


def tokenize_with_offsets(tokenizer, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[int], list[int]]:
    """(ids, char_start, char_end) of `text`, never truncated; tokens the post-processor adds get offsets -1."""
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=False)
    ids = list(encoding["input_ids"])
    # sequence_ids is None exactly for tokens added by the post-processor (BOS/EOS), not for specials in `text`.
    sequence_ids = encoding.encodings[0].sequence_ids
    starts = [start if seq is not None else -1 for (start, _), seq in zip(encoding["offset_mapping"], sequence_ids)]
    ends = [end if seq is not None else -1 for (_, end), seq in zip(encoding["offset_mapping"], sequence_ids)]
    return ids, starts, ends


def string_field(data: dict, name: str, at: str) -> str:
    """data[name] as a non-empty string, else InputError."""
    value = data.get(name)
    if not isinstance(value, str):
        raise InputError(f"{at}: field {name!r} must be a string, got {type(value).__name__}; fix the record.")
    if not value.strip():
        raise InputError(f"{at}: field {name!r} is empty (an empty document has nothing to train on); remove the record.")
    return value


def read_span(span, index: int, text_length: int, at: str, indexes: str) -> tuple[int, int, str]:
    """Validate one span {start, end, label}: character offsets [start, end) into a text of `text_length` chars."""
    name = f"spans[{index}]"
    if not isinstance(span, dict):
        raise InputError(f"{at}: {name} must be an object {{start, end, label}}, got {type(span).__name__}.")
    start, end, label = span.get("start"), span.get("end"), span.get("label")
    for key, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{at}: {name}.{key} must be an integer character offset, got {value!r}.")
    if not isinstance(label, str) or not label:
        raise InputError(f"{at}: {name} has no label (got {label!r}); give every span a non-empty string 'label'.")
    if not 0 <= start < end <= text_length:
        raise InputError(
            f"{at}: {name} [{start}, {end}) is not a non-empty range inside {indexes} ({text_length} characters); "
            "spans are Python str offsets with 0 <= start < end <= len(text)."
        )
    return start, end, label


def span_list(data: dict, fields: FieldNames, at: str) -> list:
    spans = data.get(fields.spans)
    if spans is None:
        return []
    if not isinstance(spans, list):
        raise InputError(f"{at}: field {fields.spans!r} must be a list of {{start, end, label}} objects, got {type(spans).__name__}.")
    return spans


def labels_from_spans(spans: list[tuple[int, int, str]], char_start: list[int], char_end: list[int], text: str, at: str) -> list[str | None]:
    """Per-token labels: a token takes a span's label when [char_start, char_end) overlaps the span [start, end).

    Spans are absolute offsets into `text`; tokens with offset -1 never take a label. Two spans with
    different labels on one token are an InputError naming both spans.
    """
    starts, ends = np.asarray(char_start, dtype=np.int64), np.asarray(char_end, dtype=np.int64)  # (T,)
    owner = np.full(len(starts), -1, dtype=np.int64)  # index of the span that labelled each token
    labels: list[str | None] = [None] * len(starts)
    for index, (start, end, label) in enumerate(spans):
        hit = (starts >= 0) & (starts < end) & (ends > start)
        for t in np.flatnonzero(hit).tolist():
            if labels[t] is not None and labels[t] != label:
                token = text[char_start[t] : char_end[t]]
                raise InputError(
                    f"{at}: spans[{owner[t]}] ({labels[t]!r}) and spans[{index}] ({label!r}) both cover token {t} {token!r}; "
                    "spans with different labels must not share a token: move their boundaries apart."
                )
            labels[t], owner[t] = label, index
    return labels


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; text and completions end with EOS as a target: use a tokenizer with eos_token.")
    return tokenizer.eos_token_id


def encode_text(record: Record, tokenizer) -> Encoded:
    """Plain text: the tokenizer's own specials (BOS if its post-processor adds one), the text, EOS; targets = text + EOS."""
    at, fields = where(record.source, record.line), record.fields
    text = string_field(record.data, fields.text, at)
    spans = [read_span(s, i, len(text), at, f"{fields.text!r}") for i, s in enumerate(span_list(record.data, fields, at))]
    ids, starts, ends = tokenize_with_offsets(tokenizer, text, add_special_tokens=True)
    ids, starts, ends = ids + [eos_id(tokenizer)], starts + [-1], ends + [-1]
    mask = [start >= 0 for start in starts[:-1]] + [True]
    return finish(ids, mask, labels_from_spans(spans, starts, ends, text, at), text, starts, ends)


def encode_completion(record: Record, tokenizer) -> Encoded:
    """Prompt (with the tokenizer's specials) + completion (without) + EOS, tokenised apart; targets = completion + EOS.

    `text` = prompt + completion; spans index the completion.
    """
    at, fields = where(record.source, record.line), record.fields
    prompt = record.data.get(fields.prompt)
    if not isinstance(prompt, str):
        raise InputError(f"{at}: field {fields.prompt!r} must be a string, got {type(prompt).__name__}; fix the record.")
    completion = string_field(record.data, fields.completion, at)
    spans = [read_span(s, i, len(completion), at, f"{fields.completion!r}") for i, s in enumerate(span_list(record.data, fields, at))]
    spans = [(start + len(prompt), end + len(prompt), label) for start, end, label in spans]
    p_ids, p_starts, p_ends = tokenize_with_offsets(tokenizer, prompt, add_special_tokens=True)
    c_ids, c_starts, c_ends = tokenize_with_offsets(tokenizer, completion, add_special_tokens=False)
    ids = p_ids + c_ids + [eos_id(tokenizer)]
    starts = p_starts + [s + len(prompt) for s in c_starts] + [-1]
    ends = p_ends + [e + len(prompt) for e in c_ends] + [-1]
    mask = [False] * len(p_ids) + [True] * (len(c_ids) + 1)
    text = prompt + completion
    return finish(ids, mask, labels_from_spans(spans, starts, ends, text, at), text, starts, ends)


def chat_messages(record: Record) -> list[dict]:
    """Validate the messages: a non-empty list of {role, content} with string fields and non-empty assistant content."""
    at, name = where(record.source, record.line), record.fields.messages
    messages = record.data[name]
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{at}: field {name!r} must be a non-empty list of {{role, content}} messages, got {messages!r:.80}.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"{at}: {name}[{i}] must be an object {{role, content}}, got {type(message).__name__}.")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"{at}: {name}[{i}].{key} must be a string, got {type(message.get(key)).__name__}; fix the record.")
        if message["role"] == "assistant" and not message["content"].strip():
            raise InputError(f"{at}: {name}[{i}] is an assistant message with empty content (nothing to train on); remove it.")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{at}: {name!r} has no assistant message (chat targets are assistant content); add one or remove the record.")
    return messages


def render_chat(tokenizer, messages: list[dict], template: str, at: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except jinja2.TemplateError as error:
        raise InputError(f"{at}: the chat template failed on this record ({error}); fix the messages or pass --chat-template.") from None


def content_starts(tokenizer, messages: list[dict], template: str, text: str, at: str) -> list[int | None]:
    """Where each message's content starts in the rendered `text` (None where the template does not copy it verbatim).

    The chat is rendered again with each content replaced by a unique placeholder, so a content that also
    occurs in a role header ("user") is not mistaken for it; each position is then checked in `text`.
    """
    placeholders = [f"<<tokenprio-content-{i}>>" for i in range(len(messages))]
    shadow = render_chat(tokenizer, [{**m, "content": p} for m, p in zip(messages, placeholders)], template, at)
    found: list[int | None] = [None] * len(messages)
    shift = 0  # length difference between `text` and `shadow` up to the current placeholder
    for match in re.finditer(r"<<tokenprio-content-(\d+)>>", shadow):
        i = int(match.group(1))
        start = match.start() + shift
        if shadow.count(placeholders[i]) == 1 and text[start : start + len(messages[i]["content"])] == messages[i]["content"]:
            found[i] = start
        shift += len(messages[i]["content"]) - len(placeholders[i])
    return found


def marker_mask(tokenizer, messages: list[dict], template: str, ids: list[int]) -> list[bool]:
    """Targets from the template's {% generation %} markers, via transformers' return_assistant_tokens_mask
    (a token is a target when its characters overlap a generation block)."""
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == ids, "apply_chat_template tokenised the rendered chat differently"
    return [bool(m) for m in out["assistant_masks"]]


def offset_mask(tokenizer, messages: list[dict], starts_in_text: list[int | None], ids: list[int], char_start: list[int], char_end: list[int], at: str) -> list[bool]:
    """Targets without generation markers: tokens overlapping each assistant content, plus the token right after
    the content when it is a special token (the end-of-turn: <|im_end|>, <|eot_id|>, </s>, ...)."""
    special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    starts, ends = np.asarray(char_start, dtype=np.int64), np.asarray(char_end, dtype=np.int64)  # (T,)
    mask = np.zeros(len(ids), dtype=bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = starts_in_text[i]
        if start is None:
            raise InputError(
                f"{at}: the content of message {i} (assistant) does not appear verbatim in the rendered chat, so its tokens "
                "cannot be found; pass --chat-template with a template that copies content unchanged or marks it with {% generation %}."
            )
        hit = np.flatnonzero((starts >= 0) & (starts < start + len(message["content"])) & (ends > start))
        mask[hit] = True
        after = int(hit[-1]) + 1
        if after < len(ids) and ids[after] in special_ids:
            mask[after] = True
    return mask.tolist()


def chat_spans(record: Record, messages: list[dict], starts_in_text: list[int | None] | None, at: str) -> list[tuple[int, int, str]]:
    """Spans of chat records index the content of message `message`; returned as offsets into the rendered text."""
    spans = []
    for index, span in enumerate(span_list(record.data, record.fields, at)):
        if not isinstance(span, dict):
            raise InputError(f"{at}: spans[{index}] must be an object {{message, start, end, label}}, got {type(span).__name__}.")
        message = span.get("message")
        if isinstance(message, bool) or not isinstance(message, int) or not 0 <= message < len(messages):
            raise InputError(f"{at}: spans[{index}].message must be a message index in [0, {len(messages)}), got {message!r}.")
        start, end, label = read_span(span, index, len(messages[message]["content"]), at, f"the content of message {message}")
        base = starts_in_text[message]
        if base is None:
            raise InputError(
                f"{at}: spans[{index}] indexes message {message}, whose content does not appear verbatim in the rendered chat; "
                "pass --chat-template with a template that copies content unchanged."
            )
        spans.append((base + start, base + end, label))
    return spans


def encode_chat(record: Record, tokenizer, chat_template: str | None) -> Encoded:
    """Render with the chat template, tokenise with add_special_tokens=False; targets = assistant content + end-of-turn.

    Masks come from {% generation %} markers when the template has them, else from locating each assistant
    content in the rendered string (see `offset_mask`).
    """
    at = where(record.source, record.line)
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError(f"{at}: a chat record, but the tokenizer has no chat template; pass --chat-template FILE (a Jinja template).")
    messages = chat_messages(record)
    template = chat_template if chat_template is not None else tokenizer.get_chat_template()
    text = render_chat(tokenizer, messages, template, at)
    ids, starts, ends = tokenize_with_offsets(tokenizer, text, add_special_tokens=False)
    has_markers = GENERATION_MARKER.search(template) is not None
    needs_positions = not has_markers or record.data.get(record.fields.spans) is not None
    starts_in_text = content_starts(tokenizer, messages, template, text, at) if needs_positions else None
    if has_markers:
        mask = marker_mask(tokenizer, messages, template, ids)
    else:
        mask = offset_mask(tokenizer, messages, starts_in_text, ids, starts, ends, at)
    if not any(mask[1:]):
        raise InputError(f"{at}: the chat template marks no assistant token as a target; pass --chat-template with a template that renders assistant content.")
    spans = chat_spans(record, messages, starts_in_text, at)
    return finish(ids, mask, labels_from_spans(spans, starts, ends, text, at), text, starts, ends)


def finish(ids: list[int], mask: list[bool], labels: list[str | None], text: str, starts: list[int], ends: list[int]) -> Encoded:
    """Position 0 predicts nothing, so it is never a target."""
    assert len(ids) == len(mask) == len(labels) == len(starts) == len(ends), "token columns must align"
    return Encoded(input_ids=ids, loss_mask=[False] + list(mask[1:]), label=labels, text=text, char_start=starts, char_end=ends)


def encode_record(record: Record, tokenizer, *, chat_template: str | None = None) -> Encoded:
    """Tokenise one record into ids, targets, labels and character offsets (see the module docstring).

    `tokenizer` must be a fast (Rust-backed) Hugging Face tokenizer: offsets come from it. `chat_template`
    is a Jinja string that replaces the tokenizer's template for chat records. Raises InputError for a bad
    record (including records of kind "error"); never truncates.
    """
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one (AutoTokenizer with use_fast=True).")
    if record.kind == "error":
        raise InputError(record.error)
    if record.kind == "text":
        return encode_text(record, tokenizer)
    if record.kind == "completion":
        return encode_completion(record, tokenizer)
    if record.kind == "chat":
        return encode_chat(record, tokenizer, chat_template)
    raise ValueError(f"unknown record kind {record.kind!r}")


# ----------------------------------------------------------------------------------------------
# Windows: the rows of the shard contract


def window_slice(encoded: Encoded, index: int, n_context: int, start: int, end: int) -> Window:
    """Tokens [start, end) as window `index`, whose first `n_context` tokens are repeated context (never targets)."""
    mask = [False] * n_context + encoded.loss_mask[start + n_context : end]
    return Window(
        window=index,
        n_context=n_context,
        input_ids=encoded.input_ids[start:end],
        loss_mask=mask,
        label=encoded.label[start:end],
        char_start=encoded.char_start[start:end],
        char_end=encoded.char_end[start:end],
    )


def split_windows(encoded: Encoded, *, max_length: int, n_context: int, long_docs: str = "window") -> tuple[list[Window], int]:
    """Split a record into rows of at most `max_length` tokens; returns (windows, truncated_tokens).

    "window": window 0 is tokens [0, L); window k > 0 starts `n_context` tokens before the end of window
    k - 1 and repeats them with loss_mask False, so every target is a target in exactly one window and
    window k covers [e_{k-1} - n_context, min(e_{k-1} - n_context + L, T)). Windows without targets are
    kept (their statistics are still computed). "truncate": one window of the first L tokens; the count of
    dropped tokens is returned. Position 0 of a window is never a target.
    """
    if max_length < 2:
        raise ValueError(f"--max-length {max_length}: must be at least 2 tokens.")
    if not 1 <= n_context < max_length:
        raise ValueError(f"--context {n_context}: must be in [1, max_length) = [1, {max_length}).")
    if long_docs not in ("window", "truncate"):
        raise ValueError(f"--long-docs {long_docs!r}: choose window or truncate.")
    n_tokens = len(encoded.input_ids)
    if long_docs == "truncate" or n_tokens <= max_length:
        return [window_slice(encoded, 0, 0, 0, min(n_tokens, max_length))], max(0, n_tokens - max_length)
    windows, end = [window_slice(encoded, 0, 0, 0, max_length)], max_length
    while end < n_tokens:
        start = end - n_context
        end = min(start + max_length, n_tokens)
        windows.append(window_slice(encoded, len(windows), n_context, start, end))
    return windows, 0
