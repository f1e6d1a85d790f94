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

from training.checkpoint import CheckpointWriteError, checkpoint_dir, read_trainer_state, rng_state, save_checkpoint, set_rng_state
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


def save_student(run: Path, step: int, student: Student, tokenizer, optimizer, counters: dict, scheduler, ctx: Dist,
                 device: torch.device) -> Path:
    """Check the weights are finite, gather what is sharded, and let rank 0 write checkpoint `step`; every rank agrees
    on the outcome, so a write error stops all of them with rank 0's message."""
    check_finite_weights(student.trainable, step, ctx)
    if student.strategy.fsdp:
        from training.fsdp import full_optimizer_state, gather_to_rank0

        named = dict(student.peft_model.named_parameters()) if student.peft_model is not None else student.model.state_dict()
        if student.peft_model is not None:
            named = {name: p for name, p in named.items() if p.requires_grad}
        weights = gather_to_rank0(named, ctx.main)
        optimizer_state = full_optimizer_state(student.core, optimizer)
    else:
        weights, optimizer_state = None, optimizer.state_dict()
    rngs = [t.cpu() for t in all_gather_flat(rng_state().to(device), ctx)]  # RNG of every rank (dropout), by rank
    saver = student.peft_model if student.peft_model is not None else student.model

    def write_model(folder: Path) -> None:
        saver.save_pretrained(folder, state_dict=weights)  # weights=None: the module's own (unsharded) state

    failure = None
    if ctx.main:
        state = {**counters, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rngs}
        try:
            save_checkpoint(run, step, write_model, tokenizer, state)
        except CheckpointWriteError as error:
            failure = error
    if any_rank(failure is not None, ctx):
        raise failure or CheckpointWriteError(f"rank 0 could not write {checkpoint_dir(run, step)}; see its message.")
    return checkpoint_dir(run, step)


def read_resume_state(latest: Path, strategy: Strategy, ctx: Dist) -> dict:
    """A checkpoint's trainer state (under FSDP only rank 0 reads the optimizer; it scatters it on restore)."""
    return read_trainer_state(latest, skip=("optimizer",) if strategy.fsdp and not ctx.main else ())


def restore_trainer_state(state: dict, student: Student, optimizer, scheduler, ctx: Dist) -> None:
    """Optimizer moments (scattered to the shards under FSDP), schedule and this rank's RNG."""
    if student.strategy.fsdp:
        from training.fsdp import load_full_optimizer_state

        load_full_optimizer_state(student.core, optimizer, state.get("optimizer", {}))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank])
