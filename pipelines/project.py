"""`tokenprio project`: scored shards onto a student's tokenizer, through character offsets, without a model.

Each record is rebuilt from its stored text and layout and encoded again with the student's tokenizer (chat
records with the student's chat template, so its role headers are never targets and its end-of-turn is,
exactly as `tokenprio score` would encode them), its tokens checked to reproduce the text, every per-token
column projected by `scoring.projection` (log-probs conserved over characters, entropies overlap-weighted,
Φ by `--phi-reduce`, labels from the stored spans), and the record re-windowed for the student's
`--max-length`. Shard k of the output holds the records of source shard k. Everything is written under a
temporary folder that is renamed to `--out` at the end, so a bad input leaves no output.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scoring.backends import load_tokenizer
from scoring.inputs import Encoded, encode_record, record_from_layout, split_windows
from scoring.projection import PHI_REDUCE, PROJECTION_RULE, ProjectionError, Tokenisation, aligned_intervals, project
from scoring.shards import (
    ShardSet,
    config_hash,
    corpus_metadata,
    documents_of,
    hold_lock,
    input_ids_digest,
    open_shards,
    read_table,
    shard_index,
    validate_table,
    summary_line,
    windows_table,
    with_metadata,
    with_statistics,
    with_weight_values,
    write_manifest,
    write_shard_file,
)


@dataclass(frozen=True)
class ProjectConfig:
    shards: str  # source shard folder (scored with the reference's tokenizer)
    tokenizer: str  # the student's tokenizer (a local folder or hub id)
    out: str  # new shard folder
    chat_template: str | None = None  # Jinja file used instead of the student tokenizer's chat template
    max_length: int | None = None  # student tokens per row (default: the source's max_length)
    n_context: int | None = None  # tokens repeated at the start of window k > 0 (default: the source's)
    phi_reduce: str = "mean"  # mean | min | max over the reference targets a student token overlaps


def output_taken(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def validate(cfg: ProjectConfig, source: ShardSet) -> tuple[int, int]:
    """Problems with the options and the source, each naming the fix; returns the (max_length, n_context) to use."""
    windowing = source.metadata.get("windowing", {})
    max_length = cfg.max_length if cfg.max_length is not None else windowing.get("max_length", 2048)
    n_context = cfg.n_context if cfg.n_context is not None else windowing.get("n_context", 256)
    out = Path(cfg.out)
    problems = []
    if cfg.phi_reduce not in PHI_REDUCE:
        problems.append(f"--phi-reduce {cfg.phi_reduce!r}: choose one of {', '.join(PHI_REDUCE)}.")
    if max_length < 2:
        problems.append(f"--max-length {max_length}: must be at least 2 tokens.")
    if not 1 <= n_context < max_length:
        problems.append(f"--context {n_context}: must be in [1, max_length) = [1, {max_length}).")
    if cfg.chat_template is not None and not Path(cfg.chat_template).is_file():
        problems.append(f"--chat-template {cfg.chat_template}: no such file.")
    if out.resolve() == source.folder.resolve() or source.folder.resolve() in out.resolve().parents:
        problems.append(f"--out {out} is the source folder or inside it; write the projected shards to a new folder.")
    elif output_taken(out):
        problems.append(f"--out {out} exists and is not an empty folder; choose a new folder.")
    truncated = source.manifest.get("totals", {}).get("truncated_tokens", 0)
    if truncated:
        problems.append(f"{source.folder}: {truncated} tokens were cut by `--long-docs truncate`, so their characters have no reference "
                        "statistics; projection needs whole records. Score with --long-docs window (the default).")
    if problems:
        raise ValueError("\n".join(problems))
    return max_length, n_context


# ----------------------------------------------------------------------------------------------
# The student's tokens of one shard


def flat_student(encodeds: list[Encoded]) -> dict[str, np.ndarray]:
    """The student's token lists of a shard, concatenated into numpy arrays, with token offsets per record."""
    lengths = np.array([len(e.input_ids) for e in encodeds], dtype=np.int64)
    return {
        "token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "input_ids": np.fromiter(chain.from_iterable(e.input_ids for e in encodeds), np.int64, int(lengths.sum())),
        "loss_mask": np.fromiter(chain.from_iterable(e.loss_mask for e in encodeds), bool, int(lengths.sum())),
        "char_start": np.fromiter(chain.from_iterable(e.char_start for e in encodeds), np.int64, int(lengths.sum())),
        "char_end": np.fromiter(chain.from_iterable(e.char_end for e in encodeds), np.int64, int(lengths.sum())),
    }


def check_reproduces(tokenizer, encodeds: list[Encoded], student: dict, names: list[str]) -> None:
    """The student's tokens give back each record's text: no unknown token, and its tokens with characters,
    decoded, are exactly the characters they cover (a normaliser that lowercases or a pre-tokenizer that
    drops characters fails here). Raises ProjectionError naming the record and the characters."""
    starts, ends, ids, offsets = student["char_start"], student["char_end"], student["input_ids"], student["token_offsets"]
    has_chars = (starts >= 0) & (ends > starts)
    doc = np.repeat(np.arange(len(encodeds)), np.diff(offsets))
    if tokenizer.unk_token_id is not None and (unknown := np.flatnonzero(has_chars & (ids == tokenizer.unk_token_id))).size:
        t = int(unknown[0])
        d = int(doc[t])
        raise ProjectionError(
            f"{names[d]}: the student tokenizer maps {encodeds[d].text[starts[t]:ends[t]]!r} (characters [{starts[t]}, {ends[t]})) to its unknown "
            f"token {tokenizer.unk_token!r}, so its ids cannot reproduce the text. Use a tokenizer whose vocabulary covers the corpus "
            "(a byte-level BPE covers any text)."
        )
    kept_offsets = np.concatenate([[0], np.cumsum(np.bincount(doc[has_chars], minlength=len(encodeds)))])
    kept_ids = ids[has_chars]
    pieces = [kept_ids[kept_offsets[d] : kept_offsets[d + 1]].tolist() for d in range(len(encodeds))]
    # The backend's own decoder (what `decode` runs, minus transformers' per-id Python checks and space clean-up).
    decoded = tokenizer.backend_tokenizer.decode_batch(pieces, skip_special_tokens=False)
    first = np.minimum.reduceat(np.where(has_chars, starts, np.iinfo(np.int64).max), offsets[:-1]) if len(ids) else []
    last = np.maximum.reduceat(np.where(has_chars, ends, -1), offsets[:-1]) if len(ids) else []
    for d, (text, encoded) in enumerate(zip(decoded, encodeds)):
        expected = encoded.text[first[d] : last[d]]
        if text != expected:
            at = next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
            raise ProjectionError(
                f"{names[d]}: the student's tokens decode to {text[max(0, at - 20):at + 20]!r} where the text reads "
                f"{expected[max(0, at - 20):at + 20]!r} (character {first[d] + at}); the tokenizer changes characters (a normaliser such as "
                "lowercasing or NFKC, an unknown token, dropped whitespace), so its ids cannot reproduce the text. Use a tokenizer that "
                "keeps every character."
            )


def tokenisation(texts, names, layouts, token_offsets, char_start, char_end, target) -> Tokenisation:
    segment_counts = np.array([len(layout.segments) for layout in layouts], dtype=np.int64)
    return Tokenisation(
        texts=texts, names=names, token_offsets=token_offsets, char_start=char_start, char_end=char_end, target=target,
        segment_offsets=np.concatenate([[0], np.cumsum(segment_counts)]).astype(np.int64),
        segment_end=np.array([end for layout in layouts for _, _, end in layout.segments], dtype=np.int64),
    )


def window_rows(doc_ids: list[str], encodeds: list[Encoded], loss_mask: np.ndarray, token_offsets: np.ndarray, max_length: int, n_context: int):
    """Re-window each record with its projected targets. Returns (rows, gather): rows (doc_id, Encoded, Window) for
    `windows_table`, and the indices of all rows' tokens in the flat student arrays, concatenated."""
    rows, gather = [], []
    for doc_id, encoded, lo, hi in zip(doc_ids, encodeds, token_offsets[:-1].tolist(), token_offsets[1:].tolist()):
        encoded = dataclasses.replace(encoded, loss_mask=loss_mask[lo:hi].tolist())
        windows, _ = split_windows(encoded, max_length=max_length, n_context=n_context)  # "window" never drops a token
        end = 0
        for window in windows:
            start = end - window.n_context
            end = start + len(window.input_ids)
            rows.append((doc_id, encoded, window))
            gather.append(np.arange(lo + start, lo + end))
    return rows, np.concatenate(gather) if gather else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# The job


def project_shards(cfg: ProjectConfig) -> dict:
    """Write `cfg.out`: the source shards projected onto the student tokenizer. Returns the new manifest."""
    # ---- checks before any work: options, source, student tokenizer
    source = open_shards(cfg.shards)
    max_length, n_context = validate(cfg, source)
    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=False)
    if not tokenizer.is_fast:
        raise ValueError(f"--tokenizer {cfg.tokenizer}: not a fast tokenizer; character offsets need one (a tokenizer.json).")
    tokenizer.backend_tokenizer.no_truncation()  # a tokenizer.json saved with truncation (data/gpt2-tokenizer) never cuts a record here
    chat_template = Path(cfg.chat_template).read_text() if cfg.chat_template else None
    prefixes = source.stat_prefixes
    windowing = {"max_length": max_length, "n_context": n_context, "long_docs": "window"}
    metadata = corpus_metadata(
        tokenizer=tokenizer, tokenizer_name=cfg.tokenizer, chat_template=chat_template, windowing=windowing,
        records_per_shard=source.metadata.get("records_per_shard"), priority=source.metadata.get("priority", "stored"),
    )
    metadata["models"] = source.metadata.get("models", {})  # the statistics are still these models', projected
    metadata["projection"] = {
        "source": {
            "folder": str(source.folder), "manifest_checksum": source.manifest["checksum"], "schema_version": source.metadata.get("schema_version"),
            "tokenizer": source.metadata.get("tokenizer", {}), "windowing": source.metadata.get("windowing", {}),
        },
        "phi_reduce": cfg.phi_reduce,
        "rule": PROJECTION_RULE,
    }
    metadata["config_hash"] = config_hash({"metadata": metadata})
    print(f"projecting {source.folder} ({source.metadata.get('tokenizer', {}).get('name')}) onto {cfg.tokenizer}: "
          f"max_length {max_length}, context {n_context}, phi-reduce {cfg.phi_reduce}")

    # ---- one pass, each source shard into a temporary folder; removed on any error. One writer per output: the lock
    # sits beside the output (which appears only at the end, by rename) and the output is checked again under it.
    out = Path(cfg.out)
    tmp = out.parent / f".{out.name}.project-tmp"
    lock = hold_lock(out.parent / f".{out.name}.lock.project", "tokenprio project", f"--out {out}")
    entries, carried = [], {"dropped_student_targets": 0, "lost_reference_targets": 0, "lost_target_logprob": {}}
    try:
        if output_taken(out):
            raise ValueError(f"--out {out} exists and is not an empty folder (another project finished it); choose a new folder.")
        shutil.rmtree(tmp, ignore_errors=True)  # a previous run's leftover (this command's own temporary name)
        for path in tqdm(source.paths, desc="project", unit="shard", file=sys.stderr):
            table, report = project_shard(path, tokenizer, chat_template, cfg.phi_reduce, prefixes, max_length, n_context)
            index = shard_index(path)
            shard_info = {"index": index, "records": report["records"], "input_ids_sha256": input_ids_digest(table), "projection": report["carried"]}
            table = with_metadata(table, metadata | {"shard": shard_info})
            validate_table(table, str(path))
            entries.append(write_shard_file(table, tmp, index))
            for key in ("dropped_student_targets", "lost_reference_targets"):
                carried[key] += report["carried"][key]
            for name, nats in report["carried"]["lost_target_logprob"].items():
                carried["lost_target_logprob"][name] = carried["lost_target_logprob"].get(name, 0.0) + nats

        # ---- manifest, then the folder takes its name
        manifest = write_manifest(
            tmp, entries, metadata, config=asdict(cfg),
            projected_from={"folder": str(source.folder), "checksum": source.manifest["checksum"], "carried": carried},
        )
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    print(summary_line(manifest, out))
    lost = ", ".join(f"{name} {nats:.3g}" for name, nats in carried["lost_target_logprob"].items()) or "none (no statistics)"
    print(f"projection: {carried['dropped_student_targets']} student targets without a reference target (made non-targets), "
          f"{carried['lost_reference_targets']} reference targets not fully carried, target log-prob not carried (nats): {lost}")
    return manifest


def project_shard(path: Path, tokenizer, chat_template: str | None, phi_reduce: str, prefixes: list[str], max_length: int, n_context: int):
    """One source shard → the projected shard table (metadata added by the caller) and what it carried."""
    # ---- the reference's records and the student's encoding of each
    docs = documents_of(read_table(path), str(path))
    names = [f"{path}, row {row} (doc {doc_id})" for row, doc_id in zip(docs.first_row.tolist(), docs.doc_id)]
    encodeds = []
    for d in range(len(docs.doc_id)):
        record = record_from_layout(docs.text[d], docs.layout[d], source=str(path), line=int(docs.first_row[d]), doc_id=docs.doc_id[d])
        encodeds.append(encode_record(record, tokenizer, chat_template=chat_template))
        if any(start < 0 for _, start, _ in encodeds[-1].layout.segments):
            raise ProjectionError(f"{names[d]}: the student's chat template does not copy a message content verbatim, so its characters "
                                  "cannot be matched with the reference's; pass --chat-template with a template that copies content unchanged.")
    student = flat_student(encodeds)
    check_reproduces(tokenizer, encodeds, student, names)

    # ---- projection of every per-token column (scoring.projection)
    ref_side = tokenisation(docs.text, names, docs.layout, docs.token_offsets, docs.char_start, docs.char_end, docs.loss_mask)
    student_texts, student_layouts = [e.text for e in encodeds], [e.layout for e in encodeds]
    student_side = tokenisation(student_texts, names, student_layouts, student["token_offsets"], student["char_start"], student["char_end"], student["loss_mask"])
    alignment = aligned_intervals(docs.text, [l.segments for l in docs.layout], student_texts, [l.segments for l in student_layouts], names)
    projected = project(
        ref_side, student_side, alignment, logprob={p: docs.stats[f"{p}_logprob"] for p in prefixes},
        entropy={p: docs.stats[f"{p}_entropy"] for p in prefixes}, phi=docs.weight, phi_reduce=phi_reduce,
        context_logprob={p: docs.context_stats[f"{p}_logprob"] for p in prefixes}, context_entropy={p: docs.context_stats[f"{p}_entropy"] for p in prefixes},
    )

    # ---- re-window for the student; position 0 of every row predicts nothing, and Φ is 0 off the row's mask
    rows, gather = window_rows(docs.doc_id, encodeds, projected.loss_mask, student["token_offsets"], max_length, n_context)
    table = windows_table(rows, None, None, {})
    lengths = np.array([len(w.input_ids) for _, _, w in rows], dtype=np.int64)
    row_first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    bounds = np.cumsum(lengths)[:-1]
    context = np.concatenate([np.arange(len(w.input_ids)) < w.n_context for _, _, w in rows]) if rows else np.zeros(0, bool)
    for prefix in prefixes:
        logprob = np.where(context, projected.context_logprob[prefix][gather], projected.logprob[prefix][gather]).astype(np.float32)
        entropy = np.where(context, projected.context_entropy[prefix][gather], projected.entropy[prefix][gather]).astype(np.float32)
        logprob[row_first], entropy[row_first] = np.nan, np.nan
        table = with_statistics(table, prefix, list(zip(np.split(logprob, bounds), np.split(entropy, bounds))))
    row_mask = np.fromiter(chain.from_iterable(w.loss_mask for _, _, w in rows), bool, int(lengths.sum()))
    weight = np.where(row_mask, projected.phi[gather], 0.0).astype(np.float32)
    table = with_weight_values(table, np.split(weight, bounds))
    carried = {
        "dropped_student_targets": projected.dropped_student_targets, "lost_reference_targets": projected.lost_reference_targets,
        "lost_target_logprob": projected.lost_target_logprob,
    }
    return table, {"records": len(docs.doc_id), "carried": carried}
