"""Preemption: SIGTERM/SIGUSR1 finish the step in progress, save, print "preempted at step N; rerun with --resume"
and exit with status 75; --resume then ends bit-identical to an uninterrupted run (full fine-tuning and LoRA with
dropout, whose RNG must be restored too). A second signal during the save leaves a complete checkpoint.
kill -9 + resume: tests/test_train_run.py; FSDP preemption: tests/test_train_fsdp.py.
Run: pytest tests/test_train_preempt.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from train_shards import write_shards

import training.checkpoint as checkpoint_module
import training.train as train_module
from training.checkpoint import read_state_file
from training.guards import PREEMPTED_EXIT_CODE, Preempted
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TOKENPRIO = str(Path(sys.executable).with_name("tokenprio"))  # the console script of the editable install


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("preempt_student")
    build_model(len(tokenizer), seed=1, hidden_size=64, layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    return write_shards(tmp_path_factory.mktemp("preempt_shards"), tokenizer, n_rows=48, n_shards=4, seed=3)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


def assert_same(a: Path, b: Path) -> None:
    x, y = weights(a), weights(b)
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_signal_saves_and_stops_and_a_second_during_the_save_changes_nothing(tmp_path, shards, student, monkeypatch):
    cfg = TrainConfig(shards=shards, model=student, out=tmp_path / "whole", batch_tokens=96, steps=6, save_every=2, lora_r=4, lora_dropout=0.1)
    train(cfg)
    previous = signal.getsignal(signal.SIGTERM)
    step_metrics, write_state_file = train_module.step_metrics, checkpoint_module.write_state_file

    def signalled_metrics(result, z, grad_norm, step, *args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 is being logged
        return step_metrics(result, z, grad_norm, step, *args)

    def signalled_write(folder, state, *args):
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal in the middle of the checkpoint
        time.sleep(0.05)
        write_state_file(folder, state, *args)

    monkeypatch.setattr(train_module, "step_metrics", signalled_metrics)
    monkeypatch.setattr(checkpoint_module, "write_state_file", signalled_write)
    run = tmp_path / "run"
    with pytest.raises(Preempted, match=r"preempted at step 3; rerun with --resume") as caught:
        train(replace(cfg, out=run))
    assert caught.value.step == 3 and caught.value.checkpoint == run / "checkpoint-000003"
    assert read_state_file(run / "checkpoint-000003")["step"] == 3  # complete
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-000002", "checkpoint-000003"]
    assert signal.getsignal(signal.SIGTERM) is previous  # the trainer's handlers are gone after the run
    monkeypatch.undo()
    train(replace(cfg, out=run, resume=True))
    assert_same(run / "checkpoint-000006", tmp_path / "whole" / "checkpoint-000006")
    assert losses(run) == losses(tmp_path / "whole")


def cli(shards, student, out, *extra) -> list[str]:
    return [TOKENPRIO, "train", str(shards), "--model", str(student), "--out", str(out), "--batch-tokens", "64", "--steps", "30",
            "--save-every", "4", "--priority", "rho1(k=0.5) * stored", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora-r", "4", "--lora-dropout", "0.1"]], ids=["full", "lora"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, shards, student, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "preempted"
    process = subprocess.Popen(cli(shards, student, run, *extra), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (run / "checkpoint-000004").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    found = re.search(r"preempted at step (\d+); rerun with --resume", out + err)
    assert found, (out + err)[-2000:]
    step = int(found.group(1))
    assert 4 <= step < 30, "the run finished before the signal; the test proves nothing"
    assert read_state_file(run / f"checkpoint-{step:06d}")["step"] == step
    assert not list(run.glob(".*.tmp"))
    subprocess.run(cli(shards, student, run, *extra, "--resume"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    whole = tmp_path / "whole"
    subprocess.run(cli(shards, student, whole, *extra), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert_same(run / "checkpoint-000030", whole / "checkpoint-000030")
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 31))
    assert losses(run) == losses(whole)
