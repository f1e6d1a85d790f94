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

Checkpoints: the model is gathered to rank 0 on the CPU one tensor at a time and written as the Hugging
Face or PEFT folder that one process loads; the optimizer state stays sharded: each rank writes its local
shards (safetensors + JSON, training/checkpoint.py) and reads them back into DTensors of the same
placement on resume (same world size). Neither uses torch.distributed.checkpoint, whose metadata file is
a pickle.
"""

from __future__ import annotations

import torch
from torch import nn
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


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each DTensor moment replaced by this rank's local shard (no communication)."""
    state = optimizer.state_dict()
    local = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in moments.items()} for i, moments in state["state"].items()}
    return {"state": local, "param_groups": state["param_groups"]}


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of local_optimizer_state: each local shard becomes a DTensor placed like its parameter, then loaded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    for i, p in zip(ids, params):
        for key, value in state["state"].get(i, {}).items():
            if isinstance(p, DTensor) and value.dim() > 0:  # the moments; `step` is a plain scalar
                state["state"][i][key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(state)
