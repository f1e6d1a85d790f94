"""Checkpoints: a Hugging Face model folder (safetensors) plus the trainer state for an exact resume.

RUN/checkpoint-NNNNNN/ holds `save_pretrained` output, the tokenizer and `trainer_state.pt` = (step, epoch,
step in epoch, optimizer, scheduler, RNG). It is written as `.checkpoint-NNNNNN.tmp` and renamed, so a run
killed at any moment leaves either a complete checkpoint or none; resume takes the highest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{6})$")


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step:06d}"


def latest_checkpoint(run: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = [p for p in run.glob("checkpoint-*") if CHECKPOINT_PATTERN.match(p.name) and (p / STATE_NAME).exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, model, tokenizer, trainer_state: dict) -> Path:
    """Write model + tokenizer + trainer state atomically (temporary folder, then rename)."""
    final = checkpoint_dir(run, trainer_state["step"])
    tmp = run / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_NAME)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)


def truncate_metrics(run: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a killed run may have logged steps its checkpoint lacks)."""
    path = run / METRICS_NAME
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
