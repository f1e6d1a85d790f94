"""`tokenprio add-model` and `tokenprio finalize`: a second model over stored rows, one command per job.

Run: pytest tests/test_add_model.py
"""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import build_model, build_tokenizer
from test_score import config, float64_stats, write_jsonl, RECORDS
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from pipelines.add_model import AddModelConfig, add_model
from pipelines.cli import app
from pipelines.score import score
from scoring.backends import ScorerConfig
from scoring.shards import MANIFEST_NAME, ShardError, open_shards


@pytest.fixture()
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", RECORDS)


def base_config(shards, base_model_dir, **overrides) -> AddModelConfig:
    defaults = dict(shards=str(shards), scorer=ScorerConfig(model=str(base_model_dir), batch_tokens=64), prefix="base")
    return AddModelConfig(**(defaults | overrides))


def test_second_model_adds_base_columns_over_stored_rows(corpus, tmp_path, model_dir, base_model_dir):
    ref, both = tmp_path / "ref", tmp_path / "both"
    score(config(corpus, ref, model_dir))
    add_model(base_config(ref, base_model_dir, out=str(both)))
    df_ref, df = pd.read_parquet(ref), pd.read_parquet(both)
    assert list(df.id) == list(df_ref.id)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    for row, row_ref in zip(df.itertuples(), df_ref.itertuples()):
        np.testing.assert_array_equal(row.ref_logprob, row_ref.ref_logprob)
        np.testing.assert_array_equal(row.weight, row_ref.weight)
        np.testing.assert_allclose(row.base_logprob[1:], float64_stats(base, list(row.input_ids))[0], atol=2e-5)
    meta = open_shards(both).metadata
    assert set(meta["models"]) == {"ref", "base"}
    manifest = json.loads((both / MANIFEST_NAME).read_text())
    assert manifest["config"]["prefix"] == "base" and "priority" not in manifest["config"]  # no option it did not apply


def test_second_model_with_another_tokenizer_is_refused(corpus, tmp_path, model_dir):
    ref = tmp_path / "ref"
    score(config(corpus, ref, model_dir))
    other = tmp_path / "other_model"
    other_tokenizer = build_tokenizer(vocab_size=300)
    build_model(len(other_tokenizer)).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    with pytest.raises(ShardError, match="tokenizer differs"):
        add_model(base_config(ref, other, out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_second_model_in_place_adds_columns_and_a_rerun_skips(corpus, tmp_path, model_dir, base_model_dir):
    shards = tmp_path / "shards"
    score(config(corpus, shards, model_dir))
    before = pd.read_parquet(shards)
    cfg = base_config(shards, base_model_dir, in_place=True)
    add_model(cfg)
    after = pd.read_parquet(shards)
    assert list(after.id) == list(before.id) and {"base_logprob", "base_entropy"} <= set(after.columns)
    assert open_shards(shards).manifest["totals"]["rows"] == len(before)
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("part-*.parquet")}
    add_model(cfg)  # complete shards are recognised and skipped
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("part-*.parquet")} == mtimes


def test_add_model_in_tasks_then_finalize_equals_one_task(corpus, tmp_path, model_dir, base_model_dir):
    ref, one, split = tmp_path / "ref", tmp_path / "one", tmp_path / "split"
    score(config(corpus, ref, model_dir))
    whole = add_model(base_config(ref, base_model_dir, out=str(one)))
    for task_index in range(2):
        add_model(base_config(ref, base_model_dir, out=str(split), num_tasks=2, task_index=task_index))
    with pytest.raises(ShardError, match="tokenprio finalize"):
        open_shards(split)
    result = CliRunner().invoke(app, ["finalize", str(split)])
    assert result.exit_code == 0, result.output
    assert json.loads((split / MANIFEST_NAME).read_text())["checksum"] == whole["checksum"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "exactly one of --out NEW"),
        ({"out": "x", "in_place": True}, "exactly one of --out NEW"),
        ({"out": "SAME"}, "is the source folder"),
        ({"out": "x", "prefix": "not an id"}, "--prefix"),
        ({"out": "x", "scorer": ScorerConfig(model="m", backend="hf", vllm_entropy="topk")}, "--vllm-entropy applies to the vllm backend"),
        ({"out": "x", "scorer": ScorerConfig(model="m", backend="vllm", batch_tokens=64)}, "--batch-tokens applies to the hf backend"),
    ],
)
def test_add_model_refuses_bad_options_before_loading(tmp_path, base_model_dir, overrides, message):
    shards = tmp_path / "shards"
    if overrides.get("out") == "SAME":
        overrides = {**overrides, "out": str(shards)}
    with pytest.raises(ValueError, match=message):
        add_model(base_config(shards, base_model_dir, **overrides))


def test_cli_commands_refuse_options_that_do_not_apply(corpus, tmp_path, tokenizer_dir):
    runner = CliRunner()
    # score without a model loads none: model options would be ignored, so they are refused.
    result = runner.invoke(app, ["score", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "a"), "--dtype", "bfloat16"])
    assert result.exit_code == 1 and "need --model" in result.output
    # second-model flags are not score's, and score's corpus flags are not add-model's.
    assert runner.invoke(app, ["score", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "b"), "--in-place"]).exit_code == 2
    result = runner.invoke(app, ["add-model", str(tmp_path), "--model", "m", "--prefix", "base", "--out", "x", "--priority", "uniform"])
    assert result.exit_code == 2 and "No such option" in result.output
    for command in ("score", "add-model", "finalize"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0
