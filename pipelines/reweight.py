"""`tokenprio reweight`: recompute Φ from stored statistics into a new shard folder, without a model.

Global terms (Token Cleaning's corpus-wide top-k, the Forgetting split) are resolved first by one pass
over the stored columns into a literal threshold, which is recorded in the spec, the shards' metadata
and the manifest, so the trainer can evaluate the same Φ batch by batch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from scoring.priority import check_offline, parse_offline, parse_priority, resolve_global
from scoring.shards import (
    MANIFEST_NAME,
    ShardSet,
    flat_token_columns,
    hold_lock,
    open_shards,
    read_metadata,
    read_table,
    run_metadata,
    shard_index,
    with_metadata,
    with_weights,
    write_manifest,
    write_shard_file,
)


@dataclass(frozen=True)
class ReweightConfig:
    shards: str  # source shard folder
    priority: str  # Φ spec over stored columns
    out: str  # new shard folder (never the source)


def resolve_spec(source: ShardSet, priority):
    """Resolve the parsed spec's global terms over the whole corpus (one pass over the stored columns)."""
    if priority.unresolved_global:
        label_names: list[str] = []  # one code table for the whole corpus, grown shard by shard

        def batches():
            for path in source.paths:
                table = read_table(path, columns=["input_ids", "loss_mask", *sorted(priority.columns)], validate=False)
                yield flat_token_columns(table, sorted(priority.columns), label_names)[0]

        shard_batches = tqdm(batches(), total=len(source.paths), desc="resolve global terms", unit="shard", file=sys.stderr)
        priority = resolve_global(priority, shard_batches, label_names=label_names)
    return parse_offline(priority.text, source.spec_columns, "reweight")


def reweight(cfg: ReweightConfig) -> dict:
    """Write `cfg.out`: the source shards with `weight` = Φ(cfg.priority). Returns the new manifest."""
    # ---- checks before any work
    source = open_shards(cfg.shards)
    out = Path(cfg.out)
    if out.resolve() == source.folder.resolve():
        raise ValueError(f"--out {out} is the source folder; write the reweighted shards to a new folder.")
    parsed = parse_priority(cfg.priority, source.spec_columns)
    check_offline(parsed, "reweight")
    # One writer per output folder, and the folder checked under the lock (before the pass over the corpus), so a
    # reweight that finished while this one started is never overwritten.
    lock = hold_lock(out / ".lock.reweight", "tokenprio reweight", f"--out {out}")
    if (out / MANIFEST_NAME).exists():
        lock.release()
        raise ValueError(f"--out {out} already holds a shard set; choose a new folder.")
    priority = resolve_spec(source, parsed)
    print(f"priority: {priority.text}")

    # ---- one pass: Φ per shard, same rows, new weight column and spec in the metadata
    entries = []
    for path in tqdm(source.paths, desc="reweight", unit="shard", file=sys.stderr):
        table = with_weights(read_table(path), priority)
        entries.append(write_shard_file(with_metadata(table, read_metadata(path) | {"priority": priority.text}), out, shard_index(path)))

    # ---- manifest
    manifest = write_manifest(
        out, entries, run_metadata(out, entries, source.metadata),
        config=source.manifest.get("config", {}) | {"priority": priority.text},
        reweighted_from={"folder": str(source.folder), "checksum": source.manifest["checksum"], "spec": cfg.priority},
    )
    lock.release()
    return manifest
