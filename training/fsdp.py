"""FSDP2 (`torch.distributed.fsdp.fully_shard`): shard the student over the ranks, gather it back to save.

Units: each decoder layer, then the root, which is the trainer's `StudentLoss` module (training/step.py) so
that the embeddings, final norm and output head are all-gathered around its forward and around
`statistics` (the no-grad pass of online Φ, registered as a second forward method). Inside one unit
FSDP2 keeps one DTensor per parameter, so the frozen base weights and the trainable LoRA matrices of a
layer share its all-gather; only parameters with a gradient are reduce-scattered (frozen ones have none).
Gradients are averaged over the W ranks (FSDP's default divide factor W, like DDP's mean), so the
trainer's W / Z scaling gives the update of one process on the same global batch.

Mixed precision: with compute dtype bfloat16 the decoder layers all-gather and compute in bfloat16 and
reduce-scatter gradients in float32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the
root keeps float32, so the output head runs in float32 as on one process. Sharded master weights and
AdamW state stay float32. With float32 compute (CPU) there is no policy at all.

Checkpoints gather full tensors to rank 0 on the CPU, one tensor at a time (model: the Hugging Face or
PEFT folder that one process loads; optimizer: `get_optimizer_state_dict(full_state_dict=True,
cpu_offload=True)`); resume scatters the optimizer state back (`broadcast_from_rank0`). Intermediate
checkpoints use the same format, not torch.distributed.checkpoint, whose metadata file is a pickle.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (each becomes one FSDP unit)."""
    layers = getattr(model.base_model, "layers", None)  # Llama, Qwen, Mistral, Gemma...: model.model.layers
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: --fsdp shards each decoder layer, but this model has no `layers` list in its "
                         f"body ({type(model.base_model).__name__}); train it without --fsdp.")
    return list(layers)


def shard_student(core: nn.Module, model: nn.Module, compute_dtype: torch.dtype) -> None:
    """fully_shard each decoder layer of `model`, then `core` (the StudentLoss holding it) as the root, in place."""
    layer_policy = MixedPrecisionPolicy() if compute_dtype == torch.float32 else MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=layer_policy)
    fully_shard(core)
    register_fsdp_forward_method(core, "statistics")


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's full value (a collective: every rank calls it, in the same order); others unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def gather_to_rank0(named: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of `named` on rank 0 (None elsewhere), gathered one tensor at a time; a tensor shared
    under two names (tied embeddings) is gathered once and kept shared, so save_pretrained can drop the tie."""
    gathered, by_id = {}, {}
    for name, value in named.items():
        if id(value) not in by_id:
            full = full_tensor(value.detach())
            by_id[id(value)] = full.cpu().clone() if main else None
        gathered[name] = by_id[id(value)]
    return gathered if main else None


def full_optimizer_state(core: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name, on rank 0's CPU (an empty dict elsewhere)."""
    return get_optimizer_state_dict(core, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(core: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full optimizer state (given on rank 0; `{}` elsewhere) back onto every rank."""
    set_optimizer_state_dict(core, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

