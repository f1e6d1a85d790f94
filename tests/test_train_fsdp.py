"""FSDP2 under torchrun (gloo): two processes train like one process on the same global batches, with and without
LoRA, and an FSDP run preempted by SIGTERM resumes bit-identically.

One process with --grad-accum 2 and two FSDP processes with --grad-accum 1 consume the same micro-batches per step
(micro-batch j goes to rank j mod W), so their weights agree up to float32 reduction order.
Run: pytest tests/test_train_fsdp.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from train_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun subprocesses
TOKENPRIO = str(Path(sys.executable).with_name("tokenprio"))  # the console script of the editable install
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("fsdp")
    build_model(len(tokenizer), seed=1, hidden_size=64, layers=2).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    return write_shards(root / "shards", tokenizer, n_rows=48, n_shards=4, seed=4), root / "student", root


def args(shards, student, out, grad_accum: int, steps: int, *extra) -> list[str]:
    # Global rho1 (a gather across ranks, and the no-grad `statistics` pass under FSDP) times signed stored weights.
    return ["train", str(shards), "--model", str(student), "--out", str(out), "--batch-tokens", "96", "--steps", str(steps),
            "--grad-accum", str(grad_accum), "--priority", "rho1(k=0.5) * stored", *extra]


def torchrun(*tokenprio_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python", TOKENPRIO, *tokenprio_args]


def run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, check=False, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_process_fsdp_equals_one_process(setup, lora):
    shards, student, root = setup
    extra = ["--lora-r", "4"] if lora else []
    one, two = root / f"one-{lora}", root / f"fsdp-{lora}"
    run([TOKENPRIO, *args(shards, student, one, 2, 4, *extra)])
    # Under LoRA the FSDP side also recomputes activations: neither may change the update.
    run(torchrun(*args(shards, student, two, 1, 4, *extra, "--fsdp", *(["--gradient-checkpointing"] if lora else []))))
    record = json.loads((two / "config.json").read_text())
    assert record["world_size"] == 2 and record["config"]["fsdp"]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(one / "checkpoint-000004" / name), load_file(two / "checkpoint-000004" / name)
    assert a.keys() == b.keys()
    initial = load_file(student / "model.safetensors")
    for key in a:
        moved = a[key].abs().max().item() if lora else (a[key] - initial[key]).abs().max().item()
        assert moved > 0, key
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5 * max(1.0, moved), msg=key)
    for x, y in zip(metrics(one), metrics(two)):
        assert x["z"] == y["z"] and x["targets"] == y["targets"] and x["selected_share"] == y["selected_share"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    # The final checkpoint of the sharded run is a folder one process loads.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two / "checkpoint-000004")  # LoRA: base + adapter through transformers' peft integration
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.isfinite().all()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_run_preempted_by_sigterm_resumes_exactly(setup, lora):
    """Full: the gathered weights and AdamW state are scattered back; LoRA with dropout: each rank's RNG too."""
    shards, student, root = setup
    preempted, whole = root / f"fsdp-preempted-{lora}", root / f"fsdp-whole-{lora}"
    common = ("--save-every", "4", "--fsdp", *(("--lora-r", "4", "--lora-dropout", "0.1") if lora else ()))
    process = subprocess.Popen(torchrun(*args(shards, student, preempted, 1, 24, *common)), cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (preempted / "checkpoint-000004").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # to torchrun's agent, which forwards it to both workers
        out, err = process.communicate(timeout=120)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    found = re.search(r"preempted at step (\d+); rerun with --resume", out + err)
    assert found, (out + err)[-3000:]
    step = int(found.group(1))
    assert 4 <= step < 24, "the run finished before the signal; the test proves nothing"
    # The workers exit with status 75 (tests/test_train_preempt.py checks it without torchrun); torchrun's agent was
    # signalled itself, so it forwards SIGTERM, waits for them and exits with 1 (SignalException).
    assert process.returncode == 1, err[-2000:]
    run(torchrun(*args(shards, student, preempted, 1, 24, *common, "--resume")))
    run(torchrun(*args(shards, student, whole, 1, 24, *common)))
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(preempted / "checkpoint-000024" / name), load_file(whole / "checkpoint-000024" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(preempted)] == [m["loss"] for m in metrics(whole)]


def test_fsdp_in_bfloat16_keeps_float32_master_weights_and_tracks_one_process(setup):
    """--dtype bfloat16: the layers all-gather and compute in bfloat16 and reduce in float32 (MixedPrecisionPolicy),
    one process uses autocast; the losses agree to bfloat16 precision and the saved weights are the float32 masters."""
    shards, student, root = setup
    one, two = root / "bf16-one", root / "bf16-fsdp"
    run([TOKENPRIO, *args(shards, student, one, 2, 3, "--dtype", "bfloat16")])
    run(torchrun(*args(shards, student, two, 1, 3, "--dtype", "bfloat16", "--fsdp")))
    assert json.loads((two / "config.json").read_text())["dtype"].startswith("bfloat16")
    weights = load_file(two / "checkpoint-000003" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32} and all(t.isfinite().all() for t in weights.values())
    for x, y in zip(metrics(one), metrics(two)):
        assert x["loss"] == pytest.approx(y["loss"], rel=5e-3)
