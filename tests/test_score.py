"""The score pipeline end to end: shards, references, resume, tasks, second model, reweight, bad input.

Run: pytest tests/test_score.py
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from pipelines.add_model import AddModelConfig, add_model
from pipelines.cli import app
from pipelines.reweight import ReweightConfig, reweight
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.inputs import InputError
from scoring.priority import PrioritySpecError
from scoring.shards import MANIFEST_NAME, ShardError, finalize, manifest_checksum, open_shards, shard_entry

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "plain-1", "text": "The quick brown fox jumps over the lazy dog.", "spans": [{"start": 4, "end": 9, "label": "toxic"}]},
    {"text": "To be, or not to be, that is the question."},
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n", "spans": [{"start": 4, "end": 10, "label": "code"}]},
    {"text": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 3},
    {"text": "Weng earns $12 an hour for babysitting."},
    {"text": "user assistant system: hello there, how are you today?"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", RECORDS)


def config(corpus, out, model_dir, **overrides) -> ScoreConfig:
    scorer = ScorerConfig(model=str(model_dir), batch_tokens=64)
    defaults = dict(inputs=(str(corpus),), out=str(out), scorer=scorer, max_length=24, n_context=4, records_per_shard=3)
    return ScoreConfig(**(defaults | overrides))


def float64_stats(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)[:-1]
    logprob = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    entropy = -(logp.exp() * logp).sum(-1).numpy()
    return logprob, entropy


def folder_contents(folder: Path) -> dict:
    """Shard bytes plus the manifest, without the one field that names the folder itself."""
    contents = {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["config"].pop("out") == str(folder)
    return contents | {MANIFEST_NAME: manifest}


def test_shards_hold_reference_statistics_masks_and_labels(corpus, tmp_path, model_dir):
    out = tmp_path / "shards"
    manifest = score(config(corpus, out, model_dir))
    df = pd.read_parquet(out)  # plain pandas reads the folder, skipping the manifest
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    assert manifest["totals"]["records"] == len(RECORDS) and manifest["totals"]["rows"] == len(df)
    assert manifest["totals"]["tokens"] == int(df.n_tokens.sum()) and manifest["totals"]["targets"] == int(df.n_targets.sum())
    assert df.id.is_unique and set(df.doc_id) >= {"plain-1"}
    for row in df.itertuples():
        ids = list(row.input_ids)
        logprob, entropy = float64_stats(model, ids)  # each row is scored from exactly its own tokens
        assert np.isnan(row.ref_logprob[0]) and not row.loss_mask[0] and row.weight[0] == 0
        np.testing.assert_allclose(row.ref_logprob[1:], logprob, atol=2e-5)
        np.testing.assert_allclose(row.ref_entropy[1:], entropy, atol=2e-5)
        np.testing.assert_array_equal(row.weight, np.asarray(row.loss_mask, dtype=np.float32))  # uniform Φ
    # Long record: windows make every token a target exactly once.
    long_rows = df[df.doc_id == df[df.window > 0].doc_id.iloc[0]].sort_values("window")
    assert len(long_rows) > 1 and (long_rows.n_context.iloc[1:] == 4).all()
    # Span labels land on the tokens overlapping "quick".
    plain = df[df.doc_id == "plain-1"].iloc[0]
    labelled = [i for i, label in enumerate(plain.label) if label == "toxic"]
    assert labelled and all(plain.char_start[i] < 9 and plain.char_end[i] > 4 for i in labelled)
    assert "quick" in "".join(plain.text[plain.char_start[i] : plain.char_end[i]] for i in labelled)
    # Metadata names the schema, tokenizer, model and spec.
    meta = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"tokenprio"])
    assert meta["schema_version"] == "1.1" and meta["priority"] == "uniform"
    assert meta["models"]["ref"]["backend"] == "hf" and meta["models"]["ref"]["entropy"] == "exact"


def test_unscored_shards_need_only_a_tokenizer(corpus, tmp_path, tokenizer_dir):
    out = tmp_path / "unscored"
    score(ScoreConfig(inputs=(str(corpus),), out=str(out), tokenizer=str(tokenizer_dir), max_length=24, n_context=4))
    df = pd.read_parquet(out)
    assert "ref_logprob" not in df.columns
    for row in df.itertuples():
        np.testing.assert_array_equal(row.weight, np.asarray(row.loss_mask, dtype=np.float32))


SCORE_SCRIPT = """
import os, signal, sys
import pipelines.score as score_module
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
real_write = score_module.write_shard_file
def write_then_die(table, out_dir, index):
    if index == 1:  # half-write the temporary file of the second shard, then die like kill -9
        (out_dir / f".part-{index:05d}.parquet.tmp").write_bytes(b"PAR1 partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(table, out_dir, index)
if sys.argv[4] == "crash":
    score_module.write_shard_file = write_then_die
score(ScoreConfig(inputs=(sys.argv[1],), out=sys.argv[2], scorer=ScorerConfig(model=sys.argv[3], batch_tokens=64), max_length=24, n_context=4,
                  records_per_shard=3))
"""


def run_score_process(corpus, out, model_dir, mode: str) -> int:
    """Score in a fresh process (same thread settings for every run, as a rerun on the same machine has)."""
    return subprocess.run([sys.executable, "-c", SCORE_SCRIPT, str(corpus), str(out), str(model_dir), mode], cwd=ROOT, capture_output=True).returncode


@pytest.mark.slow
def test_rerun_after_kill_equals_uninterrupted_run(corpus, tmp_path, model_dir):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    assert run_score_process(corpus, reference, model_dir, "normal") == 0
    assert run_score_process(corpus, crashed, model_dir, "crash") == -signal.SIGKILL
    assert (crashed / "part-00000.parquet").exists() and not (crashed / MANIFEST_NAME).exists()
    first_shard = (crashed / "part-00000.parquet").stat().st_mtime_ns
    assert run_score_process(corpus, crashed, model_dir, "normal") == 0
    assert (crashed / "part-00000.parquet").stat().st_mtime_ns == first_shard  # the complete shard was skipped
    assert folder_contents(crashed) == folder_contents(reference)
    assert not list(crashed.glob(".*.tmp"))


def test_num_tasks_partition_covers_every_record_once(corpus, tmp_path, model_dir):
    single, split = tmp_path / "single", tmp_path / "split"
    score(config(corpus, single, model_dir, records_per_shard=1))
    for task_index in range(3):
        task = score(config(corpus, split, model_dir, records_per_shard=1, num_tasks=3, task_index=task_index))
        assert {s["index"] % 3 for s in task["shards"]} == {task_index}
    with pytest.raises(ShardError, match="no _manifest.json"):
        open_shards(split)
    manifest = finalize(split)
    assert manifest["totals"]["records"] == len(RECORDS)
    merged, whole = pd.read_parquet(split), pd.read_parquet(single)
    assert sorted(merged.id) == sorted(whole.id) and merged.doc_id.nunique() == len(RECORDS)
    assert manifest["checksum"] == json.loads((single / MANIFEST_NAME).read_text())["checksum"]


def test_finalize_refuses_missing_tasks(corpus, tmp_path, model_dir):
    out = tmp_path / "partial"
    score(config(corpus, out, model_dir, records_per_shard=1, num_tasks=2, task_index=0))
    with pytest.raises(ShardError, match=r"tasks \[1\] of 2 have not finished"):
        finalize(out)


def test_reweight_recomputes_weights_without_a_model(corpus, tmp_path, model_dir, base_model_dir):
    ref, both, high, top = tmp_path / "ref", tmp_path / "both", tmp_path / "high", tmp_path / "top"
    score(config(corpus, ref, model_dir))
    add_model(AddModelConfig(shards=str(ref), scorer=ScorerConfig(model=str(base_model_dir)), prefix="base", out=str(both)))
    reweight(ReweightConfig(shards=str(both), priority="highpass(min_nll=3.0)", out=str(high)))
    for row in pd.read_parquet(high).itertuples():
        expected = np.asarray(row.loss_mask) & (np.nan_to_num(-np.asarray(row.ref_logprob)) > 3.0)
        np.testing.assert_array_equal(row.weight, expected.astype(np.float32))
    manifest = reweight(ReweightConfig(shards=str(both), priority="topk(k=0.5)", out=str(top)))
    df = pd.read_parquet(top)
    mask = np.concatenate(df.loss_mask.to_numpy())
    weight = np.concatenate(df.weight.to_numpy())
    excess = -np.concatenate(df.base_logprob.to_numpy()) + np.concatenate(df.ref_logprob.to_numpy())
    assert "threshold=" in manifest["metadata"]["priority"]
    assert abs(weight[mask].mean() - 0.5) < 0.05  # the global top half of the excess scores
    assert excess[mask & (weight == 1)].min() >= excess[mask & (weight == 0)].max()


def test_reweight_refuses_online_terms_and_missing_columns(corpus, tmp_path, model_dir):
    ref = tmp_path / "ref"
    score(config(corpus, ref, model_dir))
    with pytest.raises(PrioritySpecError):
        reweight(ReweightConfig(shards=str(ref), priority="rho1(k=0.6)", out=str(tmp_path / "a")))
    with pytest.raises(PrioritySpecError, match="base_logprob"):
        reweight(ReweightConfig(shards=str(ref), priority="topk(k=0.6)", out=str(tmp_path / "b")))


# ---- bad input ---------------------------------------------------------------------------------


def test_missing_model_fails_before_anything_is_written(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        score(ScoreConfig(inputs=(str(corpus),), out=str(out), scorer=ScorerConfig(model=str(tmp_path / "nope"))))
    assert not out.exists()


def test_malformed_line_names_file_and_line_and_skip_mode_counts_it(tmp_path, model_dir):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps(RECORDS[0]) + "\n{not json\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl.*2"):
        score(config(corpus, tmp_path / "a", model_dir))
    manifest = score(config(corpus, tmp_path / "b", model_dir, on_error="skip"))
    assert manifest["totals"]["records"] == 3 and manifest["totals"]["skipped_records"] == 1
    assert len(manifest["skipped_examples"]) == 1 and "bad.jsonl" in manifest["skipped_examples"][0]


def test_error_in_a_later_shard_keeps_earlier_shards_intact(tmp_path, model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", RECORDS[:3] + [{"text": ""}])
    out = tmp_path / "out"
    with pytest.raises(InputError):
        score(config(corpus, out, model_dir))
    first = out / "part-00000.parquet"
    assert first.exists() and pq.read_table(first).num_rows >= 3 and not list(out.glob(".*.tmp"))


def test_rerun_with_another_config_is_refused_unless_overwrite(corpus, tmp_path, model_dir):
    out = tmp_path / "out"
    score(config(corpus, out, model_dir))
    with pytest.raises(ShardError, match="--overwrite"):
        score(config(corpus, out, model_dir, max_length=32))
    score(config(corpus, out, model_dir, max_length=32, overwrite=True))
    assert pd.read_parquet(out).n_tokens.max() <= 32


def rewrite_first_shard(folder: Path, row: int, column: str, position: int, value: float) -> None:
    """Corrupt one stored value in place, bypassing the contract (as a buggy external tool would), and record the
    new file in the manifest (else verification refuses the changed file before any value is read)."""
    path = folder / "part-00000.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row][position] = value
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), pa.array(values, table.schema.field(column).type))
    pq.write_table(table, path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"] = [shard_entry(path) if s["file"] == path.name else s for s in manifest["shards"]]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest | {"checksum": manifest_checksum(manifest)}))


def test_nan_in_a_stored_column_is_named(corpus, tmp_path, model_dir):
    out = tmp_path / "out"
    score(config(corpus, out, model_dir))
    rewrite_first_shard(out, row=1, column="ref_logprob", position=2, value=float("nan"))
    with pytest.raises(ShardError, match=r"row 1 .*'ref_logprob', position 2"):
        reweight(ReweightConfig(shards=str(out), priority="uniform", out=str(tmp_path / "new")))


def test_unknown_schema_version_is_refused(corpus, tmp_path, model_dir):
    out = tmp_path / "out"
    score(config(corpus, out, model_dir))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["schema_version"] = "2.0"
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="schema_version '2.0'"):
        open_shards(out)


def test_priority_naming_a_missing_column_is_refused_before_scoring(corpus, tmp_path, tokenizer_dir):
    with pytest.raises(PrioritySpecError, match="ref_logprob"):
        score(ScoreConfig(inputs=(str(corpus),), out=str(tmp_path / "o"), tokenizer=str(tokenizer_dir), priority="highpass(min_nll=1)"))


def test_cli_scores_and_reports_errors_with_exit_code_1(corpus, tmp_path, model_dir):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["score", str(corpus), "--model", str(model_dir), "--out", str(out), "--max-length", "24", "--context", "4"])
    assert result.exit_code == 0, result.output
    assert (out / MANIFEST_NAME).exists()
    result = runner.invoke(app, ["score", str(corpus), "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no such model folder" in result.output
    result = runner.invoke(app, ["reweight", str(out), "--priority", "highpass(min_nll=", "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "error:" in result.output


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"long_docs": "truncate"}, "--context applies to --long-docs window"),  # config() sets n_context=4
        ({"scorer": None, "tokenizer": "TOK", "prefix": "base"}, "--prefix base names the scored model's columns"),
        ({"split": "test"}, "--split test applies to Hugging Face datasets"),
    ],
)
def test_options_that_would_be_ignored_are_refused(corpus, tmp_path, model_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        score(config(corpus, tmp_path / "out", model_dir, **overrides))
    assert not (tmp_path / "out").exists()


def test_truncate_records_no_context_and_counts_dropped_tokens(corpus, tmp_path, model_dir):
    manifest = score(config(corpus, tmp_path / "out", model_dir, long_docs="truncate", n_context=None))
    assert manifest["metadata"]["windowing"] == {"max_length": 24, "long_docs": "truncate"}
    assert manifest["totals"]["truncated_tokens"] > 0 and (pd.read_parquet(tmp_path / "out").window == 0).all()
