"""The text study's data: Tiny Shakespeare (data/tinyshakespeare, public domain), one speaker's lines to forget.

The plays are split into speeches ("NAME:\\nline\\nline"); a contiguous slice of them (the part of the file
that holds Romeo and Juliet) is cut into records of consecutive speeches of at most `record_chars`
characters. Every line spoken by `forget_speaker` is a span labelled `forget` (the name header is not).
Records are split at random into train and held-out; the oracle's corpus is the train split with the
forgotten speaker's speeches removed, as if they had never been in the data.

Every split is a function of the config only: the same config writes the same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from scoring.shards import write_text_atomic

TEXT_FILE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare" / "input.txt"
FORGET_LABEL = "forget"


@dataclass(frozen=True)
class TextDataConfig:
    out_dir: Path  # folder for train.jsonl, heldout.jsonl, oracle_train.jsonl and text_config.json
    seed: int = 0
    first_speech: int = 2400  # the slice of speeches used (Romeo and Juliet lies inside it)
    last_speech: int = 4000
    forget_speaker: str = "ROMEO"
    record_chars: int = 600  # a record holds consecutive speeches up to this many characters
    heldout_share: float = 0.1
    max_train_records: int = 0  # 0: all (the quick preset keeps a few)


def read_speeches(path: Path = TEXT_FILE) -> list[tuple[str, str]]:
    """(speaker, speech text including its "NAME:\\n" header) for every speech of the file, in order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Tiny Shakespeare text is missing; it ships with the repository (data/tinyshakespeare/input.txt).")
    speeches = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        head, sep, _ = block.partition(":\n")
        if sep and block.strip():
            speeches.append((head, block))
    return speeches


def make_record(record_id: str, speeches: list[tuple[str, str]], forget_speaker: str) -> dict:
    """One text record of consecutive speeches (separated by a blank line); the speaker's lines labelled."""
    text, spans = "", []
    for speaker, speech in speeches:
        start = len(text) + (2 if text else 0)
        text += ("\n\n" if text else "") + speech
        if speaker == forget_speaker:
            spans.append({"start": start + len(speaker) + 2, "end": len(text), "label": FORGET_LABEL})  # the lines, after "NAME:\n"
    return {"id": record_id, "text": text, "spans": spans}


def chunk(speeches: list[tuple[str, str]], record_chars: int) -> list[list[tuple[str, str]]]:
    """Consecutive speeches grouped greedily into records of at most `record_chars` characters (a longer speech alone)."""
    groups, current, size = [], [], 0
    for speech in speeches:
        if current and size + 2 + len(speech[1]) > record_chars:
            groups.append(current)
            current, size = [], 0
        current.append(speech)
        size += len(speech[1]) + (2 if size else 0)
    return groups + ([current] if current else [])


def build_text_splits(cfg: TextDataConfig) -> dict[str, list[dict]]:
    """train (with labelled spans), heldout, and oracle_train (train without the forgotten speaker's speeches)."""
    speeches = read_speeches()[cfg.first_speech : cfg.last_speech]
    groups = chunk(speeches, cfg.record_chars)
    order = list(range(len(groups)))
    random.Random(cfg.seed).shuffle(order)
    n_heldout = max(1, int(cfg.heldout_share * len(groups)))
    heldout, train = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    if cfg.max_train_records:
        train = train[: cfg.max_train_records]
        heldout = heldout[: max(1, cfg.max_train_records // 4)]
    oracle = [[s for s in groups[i] if s[0] != cfg.forget_speaker] for i in train]
    return {
        "train": [make_record(f"train-{i:05d}", groups[i], cfg.forget_speaker) for i in train],
        "heldout": [make_record(f"heldout-{i:05d}", groups[i], cfg.forget_speaker) for i in heldout],
        "oracle_train": [make_record(f"train-{i:05d}", group, cfg.forget_speaker) for i, group in zip(train, oracle) if group],
    }


def generate_text(cfg: TextDataConfig) -> dict[str, Path]:
    """Write the splits as JSONL and text_config.json into cfg.out_dir; return the paths."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in build_text_splits(cfg).items():
        paths[name] = out / f"{name}.jsonl"
        write_text_atomic(paths[name], "".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
    config = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    write_text_atomic(out / "text_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return paths
