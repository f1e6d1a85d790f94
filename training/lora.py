"""LoRA adapters through `peft`: which layers get them, how they are initialised, saved and restored.

Under LoRA the trainer holds a `peft` model whose base is the student loaded in float32; the adapted linear
layers compute W x + (α/r)·B A x with W frozen and only A (r × in) and B (out × r) trained. The output head
stays frozen unless its module name (e.g. `lm_head`) is in the targets: it is then trained in full as a peft
`modules_to_save` copy, because a low-rank adapter on the head would bypass the fused float32 output layer
(training/head.py), which reads the head's weight directly. A checkpoint holds the adapter in PEFT format
(`adapter_config.json`, `adapter_model.safetensors`, whose `base_model_name_or_path` is the student's
absolute path), loadable with `peft.PeftModel.from_pretrained(base, CHECKPOINT)`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer of the body, the output head excluded
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    r: int  # adapter rank (> 0)
    alpha: float  # scale α; the update is (α / r)·B A
    dropout: float  # dropout on the adapter's input, in [0, 1)
    targets: tuple[str, ...]  # module names (suffixes) or "all-linear"; the head's name trains the head in full


def lora_problems(r: int, alpha: float | None, dropout: float | None, targets: str | None) -> list[str]:
    """What is wrong with the LoRA options of a TrainConfig (empty list: nothing)."""
    if r == 0:
        given = [name for name, value in (("--lora-alpha", alpha), ("--lora-dropout", dropout), ("--lora-targets", targets)) if value is not None]
        return [f"{', '.join(given)}: only used with --lora-r R > 0 (LoRA); drop them or set --lora-r."] if given else []
    problems = []
    if r < 0:
        problems.append(f"lora_r={r}: must be ≥ 0 (0: full fine-tuning).")
    if importlib.util.find_spec("peft") is None:
        problems.append("--lora-r needs the peft package: pip install 'tokenprio[lora]'.")
    if alpha is not None and not alpha > 0:
        problems.append(f"lora_alpha={alpha}: must be > 0.")
    if dropout is not None and not 0 <= dropout < 1:
        problems.append(f"lora_dropout={dropout}: must be in [0, 1).")
    names = parse_targets(targets)
    if not names or any(not name.replace("_", "").replace(".", "").replace("-", "").isalnum() for name in names):
        problems.append(f"lora_targets={targets!r}: give comma-separated module names (e.g. q_proj,v_proj) or {ALL_LINEAR}.")
    return problems


def parse_targets(targets: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (targets or ALL_LINEAR).split(",") if name.strip())


def lora_settings(r: int, alpha: float | None, dropout: float | None, targets: str | None) -> LoraSettings | None:
    """The resolved settings (α defaults to 2r, dropout to 0, targets to all-linear), or None for full fine-tuning."""
    if r == 0:
        return None
    return LoraSettings(r=r, alpha=float(alpha if alpha is not None else 2 * r), dropout=float(dropout or 0.0), targets=parse_targets(targets))


def head_name(model: nn.Module) -> str:
    """The module name of the model's output head (e.g. "lm_head")."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def apply_lora(model: nn.Module, settings: LoraSettings, base_path: Path, seed: int):
    """Wrap the float32 student in a peft model with fresh adapters (A ~ kaiming-uniform from `seed`, B = 0).

    Every rank calls this with the same seed, so all start from the same adapter (FSDP does not broadcast).
    Returns (peft_model, adapted): `adapted` is the underlying Hugging Face model with the LoRA layers in
    place, the module the trainer runs; `peft_model` is what saves the adapter.
    """
    from peft import LoraConfig, get_peft_model

    head = head_name(model)
    body_targets = [name for name in settings.targets if name != head]
    train_head = head in settings.targets
    if train_head and model.config.tie_word_embeddings:
        raise ValueError(f"--lora-targets {','.join(settings.targets)}: the student ties {head} to its input embeddings; "
                         "train the head with full fine-tuning (--lora-r 0) or leave it out of the targets.")
    if ALL_LINEAR in body_targets and len(body_targets) > 1:
        raise ValueError(f"--lora-targets {','.join(settings.targets)}: {ALL_LINEAR} already names every linear layer of the body; "
                         f"give {ALL_LINEAR} alone (plus {head} to train the head) or a list of module names.")
    if not body_targets:
        raise ValueError(f"--lora-targets {','.join(settings.targets)}: name at least one layer of the body (or {ALL_LINEAR}).")
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type="CAUSAL_LM",
        target_modules=ALL_LINEAR if body_targets == [ALL_LINEAR] else body_targets,
        modules_to_save=[head] if train_head else None,
    )
    model.name_or_path = str(Path(base_path).resolve())  # peft records it as the adapter's base_model_name_or_path
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
        raise ValueError(f"--lora-targets {','.join(settings.targets)}: {error} The student's linear layers are: {', '.join(linear)}.") from error
    return peft_model, peft_model.get_base_model()


def load_adapter(peft_model, checkpoint: Path) -> None:
    """Restore the adapter (and a trained head) saved in `checkpoint` into a freshly wrapped peft model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint}: no {ADAPTER_WEIGHTS}; this checkpoint is not from a LoRA run (train with the run's own options).")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    if result.unexpected_keys:
        raise ValueError(f"{path}: holds weights this adapter does not have ({', '.join(result.unexpected_keys[:3])}, ...); "
                         "resume with the run's own --lora-* options.")


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists()
