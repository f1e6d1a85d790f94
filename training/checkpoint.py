"""Checkpoints: a Hugging Face folder one process loads, plus the trainer state for an exact resume, never a pickle.

RUN/checkpoint-NNNNNN/ holds the model (`save_pretrained`: model.safetensors, or under LoRA the PEFT
adapter: adapter_config.json + adapter_model.safetensors), the tokenizer, and the trainer state as
`trainer_state.json` (step, epoch, step in epoch, scheduler, optimizer hyperparameters; every tensor
replaced by a reference) plus `trainer_state.safetensors` (optimizer moments, per-rank RNG states). Under
FSDP each rank writes its own shard of the optimizer state, `optimizer-rankR.json` + `.safetensors`, so no
rank ever holds the full AdamW state (resume needs the same world size, which the run record enforces).
Reading runs no code: JSON and safetensors only; a `trainer_state.pt` (a pickle, as older versions wrote)
is refused, never loaded. The folder is written as `.checkpoint-NNNNNN.tmp` and renamed, so a run killed
at any moment, or stopped by a write error, leaves either a complete checkpoint or none.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_STEM = "trainer_state"
STATE_JSON, STATE_TENSORS = f"{STATE_STEM}.json", f"{STATE_STEM}.safetensors"
PICKLED_STATE = "trainer_state.pt"  # written by older versions; refused
STATE_FORMAT = 1
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{6})$")


class CheckpointError(ValueError):
    """A checkpoint folder whose trainer state cannot be read safely; the message names the file and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose trainer state is a pickle: refused, because unpickling runs whatever code it holds."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (no space, I/O error, permission); nothing partial was left."""


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step:06d}"


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint folder with the highest step, or None (only complete folders are ever renamed into place)."""
    found = [p for p in run.glob("checkpoint-*") if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


# ---- trainer state: nested dicts, lists, tuples, numbers, strings and tensors as JSON + safetensors


def encode_state(value, tensors: dict[str, torch.Tensor]):
    """A JSON-able tree of `value`; each tensor is moved into `tensors` under a fresh name and referenced."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()  # state tensors never share storage (safetensors would refuse it)
        return {"__tensor__": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode_state(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, tensors) for k, v in value.items()}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TypeError(f"trainer state: dict keys must be str or int, got {sorted({type(k).__name__ for k in value})}")
        return {"__items__": [[k, encode_state(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"trainer state: cannot store a {type(value).__name__} (only tensors, numbers, strings, lists, tuples, dicts)")


def decode_state(tree, tensor: Callable[[str], torch.Tensor]):
    """The inverse of encode_state; `tensor(name)` loads one stored tensor."""
    if isinstance(tree, list):
        return [decode_state(v, tensor) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if set(tree) == {"__tensor__"}:
        return tensor(tree["__tensor__"])
    if set(tree) == {"__tuple__"}:
        return tuple(decode_state(v, tensor) for v in tree["__tuple__"])
    if set(tree) == {"__items__"}:
        return {k: decode_state(v, tensor) for k, v in tree["__items__"]}
    return {k: decode_state(v, tensor) for k, v in tree.items()}


def write_state_file(folder: Path, state: dict, stem: str = STATE_STEM) -> None:
    """`stem`.safetensors (the tensors), then `stem`.json (the tree that refers to them)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": STATE_FORMAT, **encode_state(state, tensors)}
    save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(tree, indent=1) + "\n")


def read_state_file(folder: Path, stem: str = STATE_STEM, skip: tuple[str, ...] = ()) -> dict:
    """A state file pair of a checkpoint folder, without the top-level entries in `skip` (their tensors are not read).

    Raises UnsafeCheckpointError when the folder holds a pickled state and CheckpointError for a missing or
    malformed one.
    """
    pickled = folder / PICKLED_STATE
    if pickled.exists():
        raise UnsafeCheckpointError(
            f"{pickled}: the trainer state is a pickle, and loading a pickle runs whatever code it holds, so tokenprio never loads it. "
            f"Resume only from checkpoints that hold {STATE_JSON} + {STATE_TENSORS} (written by this version), or start a new run "
            "with another --out; to keep the weights, train from the checkpoint's model files as a new student."
        )
    path, tensors_path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not path.exists() or not tensors_path.exists():
        raise CheckpointError(f"{folder}: no {path.name} and {tensors_path.name}; not a tokenprio checkpoint, or not a complete one. "
                              "Remove the folder to resume from the previous checkpoint, or start a new run with another --out.")
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); the checkpoint is damaged. Remove the folder to resume from the previous one.") from error
    if not isinstance(tree, dict) or tree.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: unknown trainer-state format {tree.get('format') if isinstance(tree, dict) else tree!r} "
                              f"(this version reads {STATE_FORMAT}); resume with the tokenprio version that wrote it.")
    with safe_open(tensors_path, framework="pt") as stored:
        names = set(stored.keys())

        def tensor(name: str) -> torch.Tensor:
            if name not in names:
                raise CheckpointError(f"{path}: refers to tensor {name!r}, which {tensors_path.name} does not hold; the checkpoint is damaged.")
            return stored.get_tensor(name)

        return {key: decode_state(value, tensor) for key, value in tree.items() if key not in skip and key != "format"}


def rng_state() -> torch.Tensor:
    """This process's torch RNG states (CPU, then each CUDA device) as one flat uint8 tensor."""
    parts = [torch.get_rng_state()] + (list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [])
    return torch.cat(parts)


def set_rng_state(flat: torch.Tensor) -> None:
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(flat[:cpu].clone())
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(flat[cpu:].clone().view(torch.cuda.device_count(), -1)))


# ---- writing a checkpoint folder: a temporary folder, its files, then one rename


def staging_dir(run: Path, step: int) -> Path:
    return run / f".{checkpoint_dir(run, step).name}.tmp"


def start_checkpoint(run: Path, step: int) -> Path:
    """A fresh, empty temporary folder for checkpoint `step` (a leftover of a killed run is removed)."""
    tmp = staging_dir(run, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(run: Path, step: int, write_model: Callable[[Path], None], tokenizer, trainer_state: dict) -> Path:
    """Write model (`write_model(folder)`), tokenizer and trainer state (last) into the temporary folder, then rename it."""
    tmp, final = staging_dir(run, step), checkpoint_dir(run, step)
    write_model(tmp)
    tokenizer.save_pretrained(tmp)
    write_state_file(tmp, trainer_state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_failure(run: Path, step: int, error: OSError | None) -> CheckpointWriteError:
    """Remove the temporary folder and describe the failure: the checkpoint's path, the cause, what is left, the fix.
    `error` is None on ranks that only learnt that another rank failed."""
    shutil.rmtree(staging_dir(run, step), ignore_errors=True)
    final = checkpoint_dir(run, step)
    if error is None:
        return CheckpointWriteError(f"{final}: another rank could not write its part of the checkpoint; see its message.")
    cause = f"{errno.errorcode.get(error.errno, 'error')}: {error.strerror}" if error.errno else str(error)
    where = f" (at {error.filename})" if error.filename else ""
    failure = CheckpointWriteError(
        f"{final}: could not write the checkpoint: {cause}{where}. Nothing partial was kept and earlier checkpoints "
        "are intact; free space or fix the folder's permissions, then rerun the same command with --resume."
    )
    failure.errno = error.errno
    return failure


def truncate_metrics(run: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a killed run may have logged steps its checkpoint lacks)."""
    path = run / METRICS_NAME
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
