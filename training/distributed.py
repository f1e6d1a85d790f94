"""torchrun set-up and the few collectives the trainer needs (gloo on CPU, NCCL on GPU); no-ops on one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # NCCL binds each rank to its own GPU
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Dist(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(tensor: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum over ranks, in place (float64 counts stay exact)."""
    if ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_flat(tensor: torch.Tensor, ctx: Dist) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ), indexed by rank."""
    if ctx.world_size == 1:
        return [tensor]
    length = torch.tensor([tensor.numel()], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    return [g[: int(n.item())] for g, n in zip(gathered, lengths)]


def barrier(ctx: Dist) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def shutdown(ctx: Dist) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, ctx: Dist) -> bool:
    """True on every rank when `flag` is true on at least one (an all-reduce of one number; no-op on one process)."""
    if ctx.world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
