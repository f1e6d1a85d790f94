"""How the student trains: full fine-tuning or LoRA adapters, activation checkpointing, one process, DDP or FSDP.

`build_student` turns the float32 student that passed the checks into a `Student`: adapters applied
(training/lora.py), a resumed run's weights restored (before any sharding), activation checkpointing
switched on, the loss module built (training/step.py's StudentLoss) and wrapped for several processes:
DDP (the default under torchrun) or FSDP2 (training/fsdp.py). `save_student` and `restore_trainer_state`
are the collectives around a checkpoint: every rank calls them at the same step.

Every strategy optimises the same loss, Σ Φ·ℓ / Z over the global batch: DDP and FSDP both average the
summed gradients over the W ranks, and the trainer scales them by W / Z.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from training.checkpoint import (
    checkpoint_dir,
    finish_checkpoint,
    read_state_file,
    rng_state,
    set_rng_state,
    staging_dir,
    start_checkpoint,
    write_failure,
    write_state_file,
)
from training.distributed import Dist, all_gather_flat, any_rank
from training.guards import check_finite_weights
from training.lora import LoraSettings, apply_lora, load_adapter
from training.step import StudentLoss


@dataclass(frozen=True)
class Strategy:
    lora: LoraSettings | None  # None: full fine-tuning
    fsdp: bool  # FSDP2 sharding (torchrun, ≥ 2 processes) instead of DDP
    gradient_checkpointing: bool  # recompute each decoder layer's activations in backward (non-reentrant)


@dataclass(frozen=True)
class Student:
    """The student as it trains."""

    model: nn.Module  # the Hugging Face causal LM that runs (LoRA layers in place; parameters sharded under FSDP)
    peft_model: nn.Module | None  # the peft wrapper that saves the adapter (LoRA only)
    core: StudentLoss  # ids → Σ w·f(ℓ); the FSDP root under FSDP
    wrapped: nn.Module  # what accumulate_step calls: core, or DDP(core)
    trainable: list[nn.Parameter]  # what the optimizer updates (LoRA: the adapters, and the head when asked)
    strategy: Strategy


def build_student(model: nn.Module, strategy: Strategy, *, base_path: Path, seed: int, resume_from: Path | None, ctx: Dist,
                  device: torch.device, compute_dtype: torch.dtype, loss_args: dict) -> Student:
    """Adapters, resumed weights, activation checkpointing, the loss module and its multi-process wrapper, in that order.

    `model` is the float32 student on `device`; `loss_args` are StudentLoss's chunk_rows, autocast_dtype,
    neg_loss and clip_nats.
    """
    # ---- LoRA adapters (seeded: every rank builds the same), then a resumed run's weights
    peft_model = None
    if strategy.lora is not None:
        peft_model, model = apply_lora(model, strategy.lora, base_path, seed)
        if resume_from is not None:
            load_adapter(peft_model, resume_from)
    elif resume_from is not None:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(resume_from, dtype=torch.float32, use_safetensors=True)
        model.load_state_dict(saved.state_dict())
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- activation checkpointing: each decoder layer recomputed in backward (non-reentrant, exact)
    if strategy.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- the loss module, wrapped for several processes
    core = StudentLoss(model, **loss_args)
    wrapped: nn.Module = core
    if strategy.fsdp:
        from training.fsdp import shard_student

        shard_student(core, model, compute_dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]  # now the sharded DTensors
    elif ctx.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    return Student(model=model, peft_model=peft_model, core=core, wrapped=wrapped, trainable=trainable, strategy=strategy)


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    if isinstance(norm, DTensor):
        return float(norm.full_tensor())
    return float(norm)


# ---- checkpoints: collectives every rank calls at the same step


def optimizer_shard(rank: int) -> str:
    return f"optimizer-rank{rank}"


def agree(action, run: Path, step: int, ctx: Dist) -> None:
    """Run this rank's part of writing checkpoint `step`; if any rank hit an OSError, every rank raises (rank 0's or
    this rank's message, the temporary folder removed)."""
    error = None
    try:
        action()
    except OSError as caught:
        error = caught
    if any_rank(error is not None, ctx):
        raise write_failure(run, step, error)


def save_student(run: Path, step: int, student: Student, tokenizer, optimizer, counters: dict, scheduler, ctx: Dist,
                 device: torch.device) -> Path:
    """Check the weights are finite, gather what is sharded, and write checkpoint `step`: rank 0 the model, tokenizer
    and trainer state, every rank its optimizer shard under FSDP. Every rank agrees on the outcome, so a write
    error stops all of them with the failing rank's message and nothing partial left."""
    check_finite_weights(student.trainable, step, ctx)
    # ---- what is sharded or per rank, gathered (collectives, every rank)
    weights = None
    if student.strategy.fsdp:
        from training.fsdp import gather_to_rank0, local_optimizer_state

        named = ({n: p for n, p in student.peft_model.named_parameters() if p.requires_grad} if student.peft_model is not None
                 else student.model.state_dict())
        weights = gather_to_rank0(named, ctx.main)
    rngs = [t.cpu() for t in all_gather_flat(rng_state().to(device), ctx)]  # RNG of every rank (dropout), by rank
    saver = student.peft_model if student.peft_model is not None else student.model

    def write_model(folder: Path) -> None:
        saver.save_pretrained(folder, state_dict=weights)  # weights=None: the module's own (unsharded) state

    state = {**counters, "scheduler": scheduler.state_dict(), "rng": rngs}
    if not student.strategy.fsdp:
        state["optimizer"] = optimizer.state_dict()
    # ---- the temporary folder (rank 0), each rank's optimizer shard (FSDP), then model, state and rename (rank 0)
    agree(lambda: start_checkpoint(run, step) if ctx.main else None, run, step, ctx)
    if student.strategy.fsdp:
        agree(lambda: write_state_file(staging_dir(run, step), {"optimizer": local_optimizer_state(optimizer)}, optimizer_shard(ctx.rank)),
              run, step, ctx)
    agree(lambda: finish_checkpoint(run, step, write_model, tokenizer, state) if ctx.main else None, run, step, ctx)
    return checkpoint_dir(run, step)


def read_resume_state(latest: Path, strategy: Strategy, ctx: Dist) -> dict:
    """A checkpoint's trainer state; under FSDP with this rank's shard of the optimizer state."""
    state = read_state_file(latest)
    if strategy.fsdp:
        if not (latest / f"{optimizer_shard(ctx.rank)}.json").exists():
            raise ValueError(f"{latest}: holds no optimizer shard for rank {ctx.rank}; resume an FSDP run with --fsdp and the number of "
                             "processes it was started with (world_size in the run's config.json).")
        state["optimizer"] = read_state_file(latest, optimizer_shard(ctx.rank))["optimizer"]
    return state


def restore_trainer_state(state: dict, student: Student, optimizer, scheduler, ctx: Dist) -> None:
    """Optimizer moments (local shards placed back into DTensors under FSDP), schedule and this rank's RNG."""
    if student.strategy.fsdp:
        from training.fsdp import load_local_optimizer_state

        load_local_optimizer_state(optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank])
