"""Scored shards built in the test process for the trainer tests: random Φ (incl. negatives), labels, ref statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from conftest import CORPUS

from scoring.shards import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    build_manifest,
    shard_schema,
    tokenizer_fingerprint,
    write_json_atomic,
    write_shard_file,
)

TEXTS = CORPUS[:6]  # the six distinct sentences the test tokenizer was trained on


def shard_metadata(tokenizer) -> dict:
    return {"schema_version": SCHEMA_VERSION, "tokenizer": {"name": "test-bpe", "fingerprint": tokenizer_fingerprint(tokenizer)}}


def make_rows(tokenizer, n_rows: int, seed: int, negative_share: float = 0.2) -> dict:
    """Columns of n_rows windows: texts cut at random lengths, loss_mask on the second half of each row,
    weight ~ U(0, 2) with `negative_share` of targets at −1, ref statistics random, label "toxic" where Φ < 0."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("id", "doc_id", "window", "n_context", "n_tokens", "n_targets", "input_ids", "loss_mask",
                            "weight", "label", "text", "char_start", "char_end", "ref_logprob", "ref_entropy")}
    for i in range(n_rows):
        text = TEXTS[i % len(TEXTS)]
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        ids = ids[: int(rng.integers(6, len(ids) + 1))]
        n = len(ids)
        mask = np.zeros(n, dtype=bool)
        mask[max(1, n // 2) :] = True
        weight = rng.uniform(0.0, 2.0, n).astype(np.float32)
        weight[rng.random(n) < negative_share] = -1.0
        weight[~mask] = 0.0
        ref_logprob = -rng.uniform(0.1, 6.0, n).astype(np.float32)
        ref_entropy = rng.uniform(0.1, 5.0, n).astype(np.float32)
        ref_logprob[0] = ref_entropy[0] = np.nan
        cols["id"].append(f"doc{i}:0")
        cols["doc_id"].append(f"doc{i}")
        cols["window"].append(0)
        cols["n_context"].append(0)
        cols["n_tokens"].append(n)
        cols["n_targets"].append(int(mask.sum()))
        cols["input_ids"].append(ids)
        cols["loss_mask"].append(mask.tolist())
        cols["weight"].append(weight.tolist())
        cols["label"].append(["toxic" if w < 0 else None for w in weight])
        cols["text"].append(text)
        cols["char_start"].append([-1] * n)
        cols["char_end"].append([-1] * n)
        cols["ref_logprob"].append(ref_logprob.tolist())
        cols["ref_entropy"].append(ref_entropy.tolist())
    return cols


def write_shards(out: Path, tokenizer, *, n_rows: int = 48, n_shards: int = 2, seed: int = 0, negative_share: float = 0.2,
                 rows_override: dict | None = None, metadata: dict | None = None) -> Path:
    """A finished shard folder (part files + manifest) of n_rows rows over n_shards files."""
    metadata = metadata or shard_metadata(tokenizer)
    schema = shard_schema(["ref"], metadata)
    cols = make_rows(tokenizer, n_rows, seed, negative_share)
    cols.update(rows_override or {})
    table = pa.table(cols, schema=schema)
    per = -(-n_rows // n_shards)
    entries = [write_shard_file(table.slice(k * per, per), out, k) for k in range(n_shards)]
    write_json_atomic(out / MANIFEST_NAME, build_manifest(entries, metadata))
    return out
