"""Reading corpus inputs: check them up front, stream their records, classify each record and give it an id.

Inputs are JSONL / JSON / Parquet / CSV files, folders saved with `datasets`' save_to_disk, or Hugging Face
dataset names. `iter_records` yields one `Record` per row, of kind text | chat | completion | error.

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

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# What a 1-based `Record.line` counts, by source: lines of the file, items of a JSON list, rows of a table.
POSITION_WORD = {".jsonl": "line", ".csv": "line", ".json": "item", ".parquet": "row"}
DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gsm8k" or "openai/gsm8k"
FIELD_OPTIONS = "--text-field, --messages-field, --prompt-field and --completion-field"
PARQUET_BATCH_ROWS = 1024  # rows decoded to Python at a time
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: JSON can escape one, no tokenizer or Parquet file takes it


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


def where(source: str, line: int) -> str:
    """`data/x.jsonl, line 3` / `data/x.parquet, row 3` / `gsm8k, row 3`: how messages name a record."""
    return f"{source}, {POSITION_WORD.get(Path(source).suffix.lower(), 'row')} {line}"


def surrogate_problem(value: str, what: str) -> str | None:
    """What is wrong when the string `value` (described by `what`, e.g. "field 'text'") holds a lone surrogate, else None."""
    found = LONE_SURROGATE.search(value)
    if found is None:
        return None
    return f"{what} holds an unpaired UTF-16 surrogate {found.group()!r} at character {found.start()} (a \\uXXXX escape without its pair); fix or remove it."


def json_limit_problem(error: ValueError | RecursionError) -> str:
    """json.loads / json.dumps refuse integers over sys.get_int_max_str_digits() digits and deep nesting."""
    if isinstance(error, RecursionError):
        return "JSON nested too deeply to read (about 1000 levels or more)"
    return f"a JSON integer too long to read ({error.args[0].split(':')[0]})"


# ----------------------------------------------------------------------------------------------
# Checking inputs up front


def is_dataset_folder(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def input_problem(name: str) -> str | None:
    """What is wrong with one input (None if nothing): a missing file, an unknown extension, a bad dataset name."""
    path = Path(name)
    suffix = path.suffix.lower()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as error:  # pathlib answers False only for missing paths; a name too long raises ENAMETOOLONG
        return f"{name}: cannot be checked as a path ({error.strerror}); check the path."
    if is_dir:
        if is_dataset_folder(path):
            return None
        return f"{name}: a folder but not a dataset saved with datasets' save_to_disk; pass its files ({', '.join(FILE_EXTENSIONS)}) instead."
    if is_file:
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
            except (ValueError, RecursionError) as error:
                yield line_no, None, f"{json_limit_problem(error)}; fix or remove the line.", line
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
    except (ValueError, RecursionError) as error:
        raise InputError(f"{path}: {json_limit_problem(error)}; fix the file.") from None
    if not isinstance(items, list):
        raise InputError(f"{path}: a .json input must hold a list of objects, got {type(items).__name__}; for one object per line use .jsonl.")
    for index, item in enumerate(items, start=1):
        if isinstance(item, dict):
            yield index, item, None, ""
        else:
            try:
                raw = json.dumps(item, default=str)
            except RecursionError:  # nested deeper than json.dumps writes: the id comes from the file name and item alone
                raw = ""
            yield index, None, f"expected a JSON object, got {type(item).__name__}; the list must hold objects.", raw


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
            except (ValueError, RecursionError) as error:
                return None, f"field {name!r}: {json_limit_problem(error)}."
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
    # surrogatepass: a lone surrogate (refused later, naming its field) must not stop the numbering; same bytes otherwise
    return hashlib.sha256(f"{Path(source).name}\n{line}\n{content}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


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
    try:
        content = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    except RecursionError as error:  # json.loads accepts a little more nesting than json.dumps can write back
        return Record(source, line, derive_doc_id(source, line, raw), "error", {}, f"{where(source, line)}: {json_limit_problem(error)}.", fields)
    doc_id = derive_doc_id(source, line, content)
    given = data.get(fields.id)
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (str, int)) or given == "":
            message = f"{where(source, line)}: field {fields.id!r} must be a non-empty string or integer, got {given!r:.80}; fix it or pass --id-field."
            return Record(source, line, doc_id, "error", data, message, fields)
        problem = surrogate_problem(given, f"field {fields.id!r}") if isinstance(given, str) else None
        if problem:
            return Record(source, line, doc_id, "error", data, f"{where(source, line)}: {problem}", fields)
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
