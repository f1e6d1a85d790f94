"""Two processes under torchrun (DDP, gloo) give the same training as one process over the same global batches.

One process with --grad-accum 2 and two processes with --grad-accum 1 consume the same micro-batches per step
(micro-batch j goes to rank j mod W), so their weights must agree up to float32 reduction order. Both use the
default batching (packed).
Run: pytest tests/test_train_ddp.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from train_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun subprocesses
TOKENPRIO = str(Path(sys.executable).with_name("tokenprio"))  # the console script of the editable install


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ddp")
    build_model(len(tokenizer), seed=1, hidden_size=64, layers=1).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return write_shards(root / "shards", tokenizer, n_rows=48, n_shards=4, seed=4), root / "student", root


def args(shards, student, out, grad_accum: int, *extra: str) -> list[str]:
    # Global rho1 (a gather across ranks) times signed stored weights (per_sign counts all-reduced).
    return ["train", str(shards), "--model", str(student), "--out", str(out), "--batch-tokens", "96", "--steps", "4",
            "--grad-accum", str(grad_accum), "--priority", "rho1(k=0.5) * stored", *extra]


@pytest.mark.parametrize("world_size,extra", [(2, ()), (2, ("--lora-r", "4"))], ids=["full", "lora"])
def test_two_process_ddp_equals_one_process(setup, world_size, extra):
    shards, student, root = setup
    root = root / ("lora" if extra else "full")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([TOKENPRIO, *args(shards, student, root / "one", world_size, *extra)],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
                          "--no-python", TOKENPRIO, *args(shards, student, root / "ddp", 1, *extra)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    record = json.loads((root / "ddp" / "config.json").read_text())
    assert record["world_size"] == world_size and record["config"]["batching"] == "packed"  # the default layout
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    one = load_file(root / "one" / "checkpoint-000004" / weights)
    two = load_file(root / "ddp" / "checkpoint-000004" / weights)
    initial = load_file(student / "model.safetensors")
    for name in one:
        moved = (one[name] - initial.get(name, torch.zeros_like(one[name]))).abs().max().item()  # LoRA: the adapter itself
        assert moved > 0, name
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5 * max(1.0, moved), msg=name)
    def metrics(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(metrics(root / "one"), metrics(root / "ddp")):
        assert a["z"] == b["z"] and a["targets"] == b["targets"] and a["selected_share"] == b["selected_share"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
