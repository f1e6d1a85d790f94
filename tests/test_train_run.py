"""`training.train.train` end to end: checkpoints, schedules through the trainer's step, refusals, kill -9 and resume.

Run: pytest tests/test_train_run.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from train_shards import make_rows, shard_metadata, write_shards

from scoring.priority import PrioritySpecError, default_normalize, parse_priority
from scoring.shards import ShardError, manifest_checksum, open_shards
from training.batching import Layout
from training.data import iter_epoch, row_groups
from training.loss import ramp_negative
from training.train import TrainConfig, TrainConfigError, train

ROOT = Path(__file__).resolve().parents[1]
TOKENPRIO = str(Path(sys.executable).with_name("tokenprio"))  # the console script of the editable install


def save_student(path: Path, tokenizer, **config) -> Path:
    model = build_model(len(tokenizer), seed=1, hidden_size=64, layers=1)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    return save_student(tmp_path_factory.mktemp("student"), tokenizer)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    return write_shards(tmp_path_factory.mktemp("run_shards"), tokenizer, n_rows=48, n_shards=4, seed=3)


def config(shards, student, out, **overrides) -> TrainConfig:
    return replace(TrainConfig(shards=shards, model=student, out=out, batch_tokens=160, steps=3), **overrides)


def test_checkpoint_loads_with_automodel_and_generates(shards, student, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    final = train(config(shards, student, tmp_path / "run", save_every=2))
    assert final == tmp_path / "run" / "checkpoint-000003" and (tmp_path / "run" / "checkpoint-000002").is_dir()
    model = AutoModelForCausalLM.from_pretrained(final)
    before = load_file(student / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    prompt = tokenizer("The quick", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["manifest_checksum"] == manifest_checksum(open_shards(shards).manifest)
    assert record["normalize"] == default_normalize(parse_priority("stored")) == "per_sign"
    assert record["config"]["priority"] == "stored" and record["total_steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def expected_phi(spec: str, step: int, tokens: dict) -> torch.Tensor:
    """Hand-written schedule values for the specs of the test below."""
    mask, weight = tokens["loss_mask"].float(), tokens["weight"]
    if spec == "warmup(stored, steps=3)":
        blend = min(step / 3, 1.0)
        return (1 - blend) * mask + blend * weight
    if spec == "switch(uniform, stored, at=2)":
        return mask if step < 2 else weight
    raise AssertionError(spec)


@pytest.mark.parametrize("spec", ["warmup(stored, steps=3)", "switch(uniform, stored, at=2)"])
def test_schedule_values_follow_the_trainer_step(shards, student, tmp_path, spec):
    """With Z = Σ|Φ| logged per step, the trainer must evaluate Φ(x, t) at t = its optimizer step."""
    train(config(shards, student, tmp_path / "run", priority=spec, normalize="abs_weight", steps=4))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    groups = row_groups(open_shards(shards))
    longest = json.loads((tmp_path / "run" / "config.json").read_text())["pack_tokens"]  # the default batching packs
    mbs = iter_epoch(groups, seed=0, epoch=0, window_groups=4, layout=Layout("packed", 160, longest), columns=["weight"], label_names=[],
                     rank=0, world_size=1)
    for step, (row, mb) in enumerate(zip(rows, mbs)):
        expected = expected_phi(spec, step, mb.tokens).abs().sum().item()
        assert row["z"] == pytest.approx(expected, rel=1e-5), (step, row["z"], expected)
    assert len({round(r["z"], 3) for r in rows}) > 1


def test_negative_ramp_scales_negative_phi_only():
    phi = torch.tensor([2.0, -1.0, 0.0, -4.0])
    assert ramp_negative(phi, 0, 4).tolist() == [2.0, -0.0, 0.0, -0.0]
    assert ramp_negative(phi, 1, 4).tolist() == [2.0, -0.25, 0.0, -1.0]
    assert ramp_negative(phi, 9, 4).tolist() == [2.0, -1.0, 0.0, -4.0]
    assert ramp_negative(phi, 0, 0).tolist() == phi.tolist()


# ---- refusals (before any training) ---------------------------------------------------------------


def broken_shards(tmp_path, tokenizer, kind: str) -> Path:
    cols = make_rows(tokenizer, 12, seed=0)
    if kind == "no_targets":
        override = {"loss_mask": [[False] * len(m) for m in cols["loss_mask"]], "n_targets": [0] * 12,
                    "weight": [[0.0] * len(w) for w in cols["weight"]]}
        return write_shards(tmp_path / kind, tokenizer, n_rows=12, n_shards=1, rows_override=override)
    if kind == "nan_weight":
        weight = [list(w) for w in cols["weight"]]
        weight[3][-1] = float("nan")
        return write_shards(tmp_path / kind, tokenizer, n_rows=12, n_shards=1, rows_override={"weight": weight})
    if kind == "other_tokenizer":
        metadata = {**shard_metadata(tokenizer), "tokenizer": {"name": "other", "fingerprint": "0" * 64}}
        return write_shards(tmp_path / kind, tokenizer, n_rows=12, n_shards=1, metadata=metadata)
    if kind == "schema_2":  # a future major version (the manifest says so; the writer refuses to write one)
        folder = write_shards(tmp_path / kind, tokenizer, n_rows=12, n_shards=1)
        manifest = json.loads((folder / "_manifest.json").read_text())
        (folder / "_manifest.json").write_text(json.dumps({**manifest, "schema_version": "2.0"}))
        return folder
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,error,match",
    [
        ("no_targets", ShardError, "no row has a trainable token"),
        ("nan_weight", ShardError, "row group 0: column 'weight' has 1 non-finite"),
        ("other_tokenizer", ValueError, "tokenizer fingerprints differ"),
        ("schema_2", ShardError, "schema_version '2.0'"),
    ],
)
def test_bad_shards_are_refused(tmp_path, tokenizer, student, kind, error, match):
    folder = broken_shards(tmp_path, tokenizer, kind)
    with pytest.raises(error, match=match):
        train(config(folder, student, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_row_longer_than_student_context_is_refused(tmp_path, tokenizer, shards):
    short = save_student(tmp_path / "short", tokenizer, max_position_embeddings=8)
    with pytest.raises(ValueError, match="context of 8 .max_position_embeddings.; the trainer never re-windows"):
        train(config(shards, short, tmp_path / "run"))


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"priority": "topk(k=0.5, score=nll)"}, ValueError, "corpus-wide threshold.*tokenprio reweight"),
        ({"priority": "highpass(source=base)"}, PrioritySpecError, "base_logprob"),
        ({"neg_loss": "bogus", "normalize": "mean"}, TrainConfigError, "(?s)normalize='mean'.*neg_loss='bogus'"),
        ({"batch_tokens": 8}, ValueError, "--batch-tokens 8 is below the longest row"),
    ],
)
def test_bad_options_are_refused(tmp_path, shards, student, overrides, error, match):
    with pytest.raises(error, match=match):
        train(config(shards, student, tmp_path / "run", **overrides))


def test_existing_run_needs_resume(tmp_path, shards, student):
    train(config(shards, student, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match="already holds checkpoint-000001; pass --resume"):
        train(config(shards, student, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match=r"cannot resume.*\(lr\)"):
        train(config(shards, student, tmp_path / "run", steps=1, lr=1e-3, resume=True))


def test_run_saved_before_the_batching_option_resumes_as_sorted(tmp_path, shards, student):
    """A config.json written before --batching and the new loss options existed was a length-sorted run without an
    anchor: it resumes with --batching sorted and is refused with the new default."""
    train(config(shards, student, tmp_path / "run", steps=1, batching="sorted"))
    path = tmp_path / "run" / "config.json"
    record = json.loads(path.read_text())
    for key in ("batching", "anchor_kl", "neg_ref", "npo_beta", "refclip_nats"):
        del record["config"][key]
    path.write_text(json.dumps(record))
    assert train(config(shards, student, tmp_path / "run", steps=1, batching="sorted", resume=True)).name == "checkpoint-000001"
    with pytest.raises(ValueError, match=r"cannot resume.*\(batching\)"):
        train(config(shards, student, tmp_path / "run", steps=1, resume=True))


# ---- kill -9 and resume ---------------------------------------------------------------------------


def cli(shards, student, out, *extra) -> list[str]:
    return [TOKENPRIO, "train", str(shards), "--model", str(student), "--out", str(out),
            "--batch-tokens", "64", "--steps", "30", "--save-every", "4", "--priority", "rho1(k=0.5) * stored", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora-r", "4", "--lora-dropout", "0.1"]], ids=["full", "lora"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, shards, student, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(cli(shards, student, killed, *extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (killed / "checkpoint-000008").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (killed / "checkpoint-000030").exists(), "the run finished before it was killed; the test proves nothing"
    subprocess.run(cli(shards, student, killed, *extra, "--resume"), cwd=ROOT, env=env, check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(cli(shards, student, whole, *extra), cwd=ROOT, env=env, check=True, capture_output=True)
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    resumed, reference = load_file(killed / "checkpoint-000030" / weights), load_file(whole / "checkpoint-000030" / weights)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    def lines(run: Path) -> list[dict]:
        return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]

    assert json.loads((whole / "config.json").read_text())["config"]["batching"] == "packed"  # the default layout
    assert [r["step"] for r in lines(killed)] == list(range(1, 31))
    assert [r["loss"] for r in lines(killed)] == [r["loss"] for r in lines(whole)]


def test_config_only_student_is_initialised_from_the_seed(tmp_path, tokenizer, shards):
    """A folder with config.json and a tokenizer but no weights: random init from `seed`, reproducible."""
    folder = tmp_path / "config_only"
    build_model(len(tokenizer), hidden_size=64, layers=1).config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    finals = [train(config(shards, folder, tmp_path / f"run{i}", steps=1, seed=seed)) for i, seed in enumerate((5, 5, 6))]
    weights = [load_file(final / "model.safetensors") for final in finals]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], weights[2]["lm_head.weight"])
    assert json.loads((tmp_path / "run0" / "config.json").read_text())["student"] == "random init from config.json, seed 5"
