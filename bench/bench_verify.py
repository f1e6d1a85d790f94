"""What verifying shards costs: the full sha256 every reader runs (scoring.shards.verify_shards), per GB of shards,
against a plain read of the same bytes and against pyarrow reading them, measured in the same run.

    .venv/bin/python bench/bench_verify.py [--gb 1.0] [--shard-mb 128] [--rounds 3] [--threads N]

Data: `--gb` of schema-1.1 shards written by the contract's own writer (zstd, ~1M-token row groups), `--shard-mb`
each, with the columns a scored corpus has: GPT-2-range token ids, loss mask, Φ, labels (1 % of tokens), text,
character offsets, record layout, and two models' statistics (ref, base) as random float32 values (incompressible,
as real log-probs are). They are written first, so every read below comes from the page cache: the numbers are
the CPU cost; a cold read from disk adds the disk's time to every method alike.

Timed, alternating method by method in each round (best round reported):
- plain read: every byte of every shard in 1 MiB blocks, one thread (the I/O the hash needs);
- sha256, 1 thread: the verifier's per-file check (size + streamed sha256) over the shards one after the other;
- verify_shards: the verifier as the readers call it (unlisted files, then the files hashed in parallel threads);
- open_shards: what a reader pays to open the folder (verification, schema checks) against open_shards(verify=False);
- pyarrow read: pq.read_table of every shard, all columns (what reweight, add-model and project read);
- train scan: the columns `tokenprio train` reads in its first pass (scan_corpus), row group by row group.
Prints GB/s (1 GB = 1e9 bytes of shard files), seconds per GB and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from scoring.shards import (  # noqa: E402
    MANIFEST_NAME,
    SCHEMA_VERSION,
    build_manifest,
    open_shards,
    shard_schema,
    verify_shards,
    write_json_atomic,
    write_shard_file,
)
from scoring.shards.integrity import BLOCK_BYTES, shard_problem  # noqa: E402

ROW_TOKENS = 1024  # tokens per row (window)
BYTES_PER_TOKEN = 19.1  # measured for these columns (bench output); sizes the shards to --shard-mb


def lists(values: np.ndarray | pa.Array, n_rows: int, typ: pa.DataType) -> pa.Array:
    offsets = pa.array(np.arange(0, n_rows * ROW_TOKENS + 1, ROW_TOKENS, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values if isinstance(values, pa.Array) else pa.array(values, typ))


def shard_table(n_rows: int, first_row: int, rng: np.random.Generator, metadata: dict) -> pa.Table:
    """n_rows windows of ROW_TOKENS tokens with every contract column (random values)."""
    n = n_rows * ROW_TOKENS
    position = np.tile(np.arange(ROW_TOKENS), n_rows)
    mask = position > ROW_TOKENS // 4  # a prompt, then the targets
    weight = np.where(mask, 1.0, 0.0).astype(np.float32)
    labels = np.where(rng.random(n) < 0.01, "toxic", None)
    chars = (position * 4).astype(np.int32)
    columns = {
        "id": pa.array([f"doc{first_row + i}:0" for i in range(n_rows)]),
        "doc_id": pa.array([f"doc{first_row + i}" for i in range(n_rows)]),
        "window": pa.array(np.zeros(n_rows, np.int32)),
        "n_context": pa.array(np.zeros(n_rows, np.int32)),
        "n_tokens": pa.array(np.full(n_rows, ROW_TOKENS, np.int32)),
        "n_targets": pa.array(np.full(n_rows, int(mask[:ROW_TOKENS].sum()), np.int32)),
        "input_ids": lists(rng.integers(0, 50_257, n).astype(np.int32), n_rows, pa.int32()),
        "loss_mask": lists(mask, n_rows, pa.bool_()),
        "weight": lists(weight, n_rows, pa.float32()),
        "label": lists(pa.array(labels, pa.string()), n_rows, pa.string()),
        "text": pa.array(["".join(rng.choice(list("abcdefgh ijklmnop"), 4 * ROW_TOKENS))] * n_rows),
        "char_start": lists(chars, n_rows, pa.int32()),
        "char_end": lists(chars + 4, n_rows, pa.int32()),
        "record_kind": pa.array(["completion"] * n_rows),
        "segments": pa.array([[{"role": "prompt", "start": 0, "end": ROW_TOKENS}, {"role": "completion", "start": ROW_TOKENS, "end": 4 * ROW_TOKENS}]] * n_rows),
        "label_spans": pa.array([[]] * n_rows, pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("label", pa.string())]))),
    }
    for prefix in ("ref", "base"):
        logprob = -rng.gamma(1.0, 2.0, n).astype(np.float32)
        entropy = rng.uniform(0.0, 6.0, n).astype(np.float32)
        logprob[position == 0] = entropy[position == 0] = np.nan
        columns[f"{prefix}_logprob"] = lists(logprob, n_rows, pa.float32())
        columns[f"{prefix}_entropy"] = lists(entropy, n_rows, pa.float32())
    return pa.table(columns, schema=shard_schema(["ref", "base"], metadata, record_fields=True))


def write_corpus(folder: Path, gb: float, shard_mb: float) -> dict:
    rng = np.random.default_rng(0)
    metadata = {"schema_version": SCHEMA_VERSION, "tokenizer": {"name": "gpt2-range", "fingerprint": "0" * 64}}
    rows_per_shard = max(1, int(shard_mb * 1e6 / BYTES_PER_TOKEN / ROW_TOKENS))
    entries, written, index = [], 0, 0
    while written < gb * 1e9:
        entries.append(write_shard_file(shard_table(rows_per_shard, index * rows_per_shard, rng, metadata | {"shard": {"index": index}}), folder, index))
        written += entries[-1]["bytes"]
        index += 1
    manifest = build_manifest(entries, metadata)
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GB of shards to write and read")
    parser.add_argument("--shard-mb", type=float, default=128.0, help="size of each shard file, MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_verify_", dir=args.dir))
    try:
        folder = work / "shards"
        started = time.perf_counter()
        manifest = write_corpus(folder, args.gb, args.shard_mb)
        paths = [folder / s["file"] for s in manifest["shards"]]
        size = sum(s["bytes"] for s in manifest["shards"])
        tokens = manifest["totals"]["tokens"]
        print(f"{len(paths)} shards, {size / 1e9:.3f} GB, {tokens:,} tokens ({size / tokens:.1f} bytes/token), written in "
              f"{time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, verify_shards uses up to {min(len(paths), os.cpu_count() or 1, 8)} threads")
        entries = {s["file"]: s for s in manifest["shards"]}

        def plain_read() -> None:
            for path in paths:
                with open(path, "rb") as f:
                    while f.read(BLOCK_BYTES):
                        pass

        def sha256_one_thread() -> None:
            assert all(shard_problem(path, entries[path.name]) is None for path in paths)

        def verify() -> None:
            verify_shards(folder, manifest)

        def open_verified() -> None:
            open_shards(folder)

        def open_unverified() -> None:
            open_shards(folder, verify=False)

        def pyarrow_read() -> None:
            for path in paths:
                pq.read_table(path)

        def train_scan() -> None:
            for path in paths:
                parquet = pq.ParquetFile(path)
                for group in range(parquet.num_row_groups):
                    parquet.read_row_group(group, columns=["n_tokens", "n_targets", "weight", "loss_mask"])

        methods = {"plain read": plain_read, "sha256, 1 thread": sha256_one_thread, "verify_shards": verify, "open_shards": open_verified,
                   "open_shards(verify=False)": open_unverified, "pyarrow read": pyarrow_read, "train scan": train_scan}
        seconds = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, method in methods.items():
                start = time.perf_counter()
                method()
                seconds[name].append(time.perf_counter() - start)
        best = {name: min(times) for name, times in seconds.items()}

        print(f"\n{'method':<28} {'GB/s':>8} {'s per GB':>9}   rounds (s)")
        for name, value in best.items():
            print(f"{name:<28} {size / value / 1e9:>8.2f} {value / (size / 1e9):>9.3f}   {', '.join(f'{t:.3f}' for t in seconds[name])}")
        print("\nratios (time / time, best rounds):")
        print(f"  sha256 (1 thread) / plain read        {best['sha256, 1 thread'] / best['plain read']:.2f}")
        print(f"  sha256 (1 thread) / pyarrow read      {best['sha256, 1 thread'] / best['pyarrow read']:.3f}")
        print(f"  verify_shards / pyarrow read          {best['verify_shards'] / best['pyarrow read']:.3f}")
        print(f"  verify_shards / train scan            {best['verify_shards'] / best['train scan']:.3f}")
        print(f"  open_shards: verified − unverified    {best['open_shards'] - best['open_shards(verify=False)']:.3f} s "
              f"({(best['open_shards'] - best['open_shards(verify=False)']) / (size / 1e9):.3f} s per GB)")
        print(json.dumps({"gb": size / 1e9, "shards": len(paths), "best_s": best}, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
