"""Checkpoints that run no code, survive write errors, and never hold NaN weights; NaN in the data the trainer reads.

- the trainer state is JSON + safetensors; a pickle in a checkpoint is refused and nothing in it runs;
- an OSError (ENOSPC) while writing a checkpoint names the path and the cause, leaves nothing partial, keeps the
  earlier checkpoints, and a rerun with --resume ends identical to an uninterrupted run;
- a diverging student stops at the first non-finite loss or gradient with the step, before any checkpoint of it;
- NaN in a stored statistic the Φ spec reads is refused with the row id.
Run: pytest tests/test_train_checkpoint.py
"""

from __future__ import annotations

import builtins
import errno
import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from train_shards import make_rows, write_shards
from typer.testing import CliRunner

import training.checkpoint as checkpoint_module
from pipelines.cli import app
from scoring.shards import ShardError
from training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    UnsafeCheckpointError,
    decode_state,
    encode_state,
    read_state_file,
)
from training.distributed import Dist
from training.guards import Diverged, check_finite_weights
from training.step import StudentLoss
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt_student")
    build_model(len(tokenizer), seed=1, hidden_size=64, layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    return write_shards(tmp_path_factory.mktemp("ckpt_shards"), tokenizer, n_rows=48, n_shards=2, seed=8)


def config(shards, student, out, **overrides) -> TrainConfig:
    return replace(TrainConfig(shards=shards, model=student, out=out, batch_tokens=96, steps=6, save_every=2,
                               priority="rho1(k=0.5) * stored"), **overrides)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, shards, student):
    """The uninterrupted run every interrupted one must equal."""
    run = tmp_path_factory.mktemp("ckpt_whole") / "run"
    train(config(shards, student, run))
    return run


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the trainer state: JSON + safetensors, never a pickle ---------------------------------------------


def test_trainer_state_round_trips_bit_exactly(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "rng": [torch.get_rng_state()], "x": (1.5, float("nan"), None, "s")}
    tensors = {}
    tree = json.loads(json.dumps(encode_state(state, tensors)))
    back = decode_state(tree, tensors.__getitem__)
    assert back["step"] == 7 and back["x"][:1] == (1.5,) and math.isnan(back["x"][1]) and back["x"][2:] == (None, "s")
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # int keys and tuples survive
    for key, moments in state["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(back["optimizer"]["state"][key][name], value) and back["optimizer"]["state"][key][name].dtype == value.dtype
    assert torch.equal(back["rng"][0], state["rng"][0])
    with pytest.raises(TypeError, match="cannot store a object"):
        encode_state({"bad": object()}, {})


class Marker:
    """Unpickling this creates `path`: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


@pytest.mark.parametrize("keep_json", [True, False], ids=["beside-json", "pickle-only"])
def test_a_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, shards, student, monkeypatch, keep_json):
    run = tmp_path / "run"
    train(config(shards, student, run, steps=2))
    latest = run / "checkpoint-000002"
    marker = tmp_path / "pwned"
    (latest / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Marker(marker)}))
    pickle.loads(pickle.dumps(Marker(tmp_path / "control")))  # the payload works when unpickled
    assert (tmp_path / "control").exists()
    if not keep_json:
        (latest / "trainer_state.json").unlink()
    monkeypatch.setattr("training.train.check_inputs", lambda *a: pytest.fail("the student was loaded before the state was checked"))
    with pytest.raises(UnsafeCheckpointError, match=r"trainer_state.pt: the trainer state is a pickle.*never loads it"):
        train(config(shards, student, run, steps=4, resume=True))
    assert not marker.exists()
    result = CliRunner().invoke(app, ["train", str(shards), "--model", str(student), "--out", str(run), "--batch-tokens", "96",
                                      "--steps", "4", "--save-every", "2", "--priority", "rho1(k=0.5) * stored", "--resume"])
    assert result.exit_code == 1 and "is a pickle" in result.output and not marker.exists()


def test_the_trainer_never_unpickles():
    sources = "\n".join(p.read_text() for p in (ROOT / "training").glob("*.py"))
    assert "torch.load(" not in sources and "import pickle" not in sources


def test_a_damaged_trainer_state_is_refused(tmp_path, shards, student):
    run = tmp_path / "run"
    train(config(shards, student, run, steps=2))
    state = run / "checkpoint-000002" / "trainer_state.json"
    tree = json.loads(state.read_text())
    tree["optimizer"]["state"]["__items__"][0][1]["exp_avg"] = {"__tensor__": "t999"}
    state.write_text(json.dumps(tree))
    with pytest.raises(CheckpointError, match="refers to tensor 't999'"):
        read_state_file(state.parent)
    state.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        train(config(shards, student, run, steps=4, resume=True))


# ---- write errors while checkpointing ----------------------------------------------------------------


def no_space(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("where", ["model", "trainer_state"])
def test_no_space_while_writing_a_checkpoint(tmp_path, shards, student, whole, monkeypatch, where):
    """ENOSPC at the second checkpoint (step 4): a clear error, no partial folder, checkpoint 2 intact; after
    space is freed, the rerun with --resume ends identical to the uninterrupted run."""
    from transformers import PreTrainedModel

    run = tmp_path / "run"
    calls = []
    if where == "model":
        original = PreTrainedModel.save_pretrained

        def save_pretrained(self, folder, *args, **kwargs):
            calls.append(folder)
            if len(calls) == 2:
                Path(folder, "model.safetensors").write_bytes(b"\0" * 100)  # a partly written file, then the disk is full
                raise no_space(Path(folder, "model.safetensors"))
            return original(self, folder, *args, **kwargs)

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    else:
        original = checkpoint_module.save_file

        def save_file(tensors, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == 2:
                raise no_space(path)
            return original(tensors, path, *args, **kwargs)

        monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-000004: could not write the checkpoint: ENOSPC: No space left on device") as caught:
        train(config(shards, student, run))
    assert caught.value.errno == errno.ENOSPC and "--resume" in str(caught.value)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-000002"]  # no .tmp, no partial 4
    assert sorted(p.name for p in (run / "checkpoint-000002").iterdir()) == sorted(p.name for p in (whole / "checkpoint-000002").iterdir())
    same_weights(run / "checkpoint-000002", whole / "checkpoint-000002")
    monkeypatch.undo()  # space freed
    train(config(shards, student, run, resume=True))
    same_weights(run / "checkpoint-000006", whole / "checkpoint-000006")
    assert losses(run) == losses(whole)


def test_a_write_error_is_one_line_from_the_cli(tmp_path, shards, student, monkeypatch):
    def save_file(tensors, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    result = CliRunner().invoke(app, ["train", str(shards), "--model", str(student), "--out", str(tmp_path / "run"), "--batch-tokens", "96",
                                      "--steps", "1"])
    assert result.exit_code == 1
    assert "checkpoint-000001: could not write the checkpoint: EACCES: Permission denied (at " in result.output
    assert not list((tmp_path / "run").glob("*checkpoint*"))


# ---- divergence ------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_diverging_student_stops_at_the_first_non_finite_step(tmp_path, shards, student, monkeypatch, what):
    """From the third optimizer step on, the hidden states (loss) or their gradients turn NaN: the run stops with
    "step 3", checkpoints 1 and 2 hold finite weights, and there is no checkpoint 3."""
    original = StudentLoss.forward
    forwards = []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        forwards.append(1)
        return out

    def picked_hidden(self, *args):
        hidden = picked(self, *args)
        if len(forwards) >= 2 and torch.is_grad_enabled():  # the gradient pass of step 3 (one micro-batch per step)
            if what == "loss":
                return hidden * float("nan")
            hidden.register_hook(lambda grad: grad * float("inf"))
        return hidden

    picked = StudentLoss.picked_hidden
    monkeypatch.setattr(StudentLoss, "forward", forward)
    monkeypatch.setattr(StudentLoss, "picked_hidden", picked_hidden)
    run = tmp_path / "run"
    expected = "the loss is nan" if what == "loss" else "the gradient norm is (nan|inf)"
    with pytest.raises(Diverged, match=rf"step 3: {expected}.*latest complete checkpoint: checkpoint-000002"):
        train(config(shards, student, run, priority="stored", save_every=1))
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-000001", "checkpoint-000002"]
    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoint-000002" / "model.safetensors").values())
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_non_finite_weights_are_never_saved():
    one = Dist(rank=0, world_size=1, local_rank=0)
    check_finite_weights([torch.ones(3)], 5, one)
    with pytest.raises(Diverged, match="step 5: the trained weights hold NaN or infinite values; not writing a checkpoint"):
        check_finite_weights([torch.ones(3), torch.tensor([1.0, float("inf")])], 5, one)


# ---- NaN in the stored data the trainer reads ----------------------------------------------------------


def test_nan_in_a_statistic_the_spec_reads_is_refused_with_the_row_id(tmp_path, tokenizer, student):
    cols = make_rows(tokenizer, 12, seed=0)
    ref = [list(v) for v in cols["ref_logprob"]]
    ref[5][-1] = float("nan")  # a target (the last token of row 5 is in its loss_mask)
    assert cols["loss_mask"][5][-1]
    folder = write_shards(tmp_path / "nan_ref", tokenizer, n_rows=12, n_shards=1, rows_override={"ref_logprob": ref})
    with pytest.raises(ShardError, match=r"row group 0: column 'ref_logprob' has 1 non-finite values at targets \(first in row 'doc5:0'\)"):
        train(config(folder, student, tmp_path / "run", priority="highpass(min_nll=0.3)", steps=1))
    assert not (tmp_path / "run").exists()
    # position 0 is NaN in every row by contract, and a spec that does not read the column trains
    train(config(folder, student, tmp_path / "run2", priority="stored", steps=1, save_every=0))
    weight = [list(v) for v in cols["weight"]]
    weight[7][-1] = float("inf")
    folder = write_shards(tmp_path / "inf_weight", tokenizer, n_rows=12, n_shards=1, rows_override={"weight": weight})
    with pytest.raises(ShardError, match=r"column 'weight' has 1 non-finite values \(first in row 'doc7:0'\)"):
        train(config(folder, student, tmp_path / "run3", steps=1))
