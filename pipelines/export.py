"""`tokenprio export`: a training checkpoint as a model folder without trainer state, for inference and serving.

    full fine-tuning checkpoint       → the Hugging Face folder (config, safetensors, tokenizer)
    LoRA checkpoint                   → the PEFT adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer)
    LoRA checkpoint with --merge      → base + (α/r)·B A merged into a plain Hugging Face folder (safetensors,
                                        tokenizer, float32), loadable with AutoModelForCausalLM and vLLM

The base of an adapter is its `base_model_name_or_path` (the student's absolute path at training time) or
`--base`. The folder is written under a temporary name and renamed; `export_config.json` records the job.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from training.checkpoint import PICKLED_STATE, STATE_JSON, STATE_TENSORS
from training.lora import ADAPTER_CONFIG, is_adapter_folder

EXPORT_CONFIG = "export_config.json"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TRAINER_FILES = {STATE_JSON, STATE_TENSORS, PICKLED_STATE}


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path  # RUN/checkpoint-NNNNNN of `tokenprio train`
    out: Path  # new folder
    merge: bool = False  # LoRA: merge the adapter into the base weights
    base: Path | None = None  # LoRA + merge: the base model folder (None: the adapter's base_model_name_or_path)


def adapter_base(checkpoint: Path, base: Path | None) -> Path:
    """The base model folder of a LoRA checkpoint, checked to be a Hugging Face folder."""
    recorded = json.loads((checkpoint / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    folder = Path(base or recorded or "")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{checkpoint / ADAPTER_CONFIG}: the adapter's base {str(folder) or '(none recorded)'} is not a model folder "
                                "(no config.json); pass the student the run started from with --base DIR.")
    return folder


def check_export(cfg: ExportConfig) -> tuple[bool, Path | None]:
    """(is_adapter, base folder when merging); every problem is refused before any model loads."""
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder; pass RUN/checkpoint-NNNNNN (train prints the final one).")
    adapter = is_adapter_folder(checkpoint)
    if not adapter and not any((checkpoint / name).exists() for name in MODEL_WEIGHTS):
        raise ValueError(f"{checkpoint}: holds neither model.safetensors nor {ADAPTER_CONFIG}; not a checkpoint of `tokenprio train`.")
    if cfg.merge and not adapter:
        raise ValueError(f"--merge: {checkpoint} is a full fine-tuning checkpoint (no adapter to merge); drop --merge.")
    if cfg.base is not None and not cfg.merge:
        raise ValueError("--base is the base model an adapter is merged into; it needs --merge.")
    if Path(cfg.out).exists():
        raise ValueError(f"--out {cfg.out}: already exists; choose a new folder (export never overwrites).")
    return adapter, adapter_base(checkpoint, cfg.base) if cfg.merge else None


def write_merged(checkpoint: Path, base: Path, folder: Path) -> None:
    """base + adapter merged (peft merge_and_unload) and saved with save_pretrained (safetensors) and the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)


def export(cfg: ExportConfig) -> Path:
    """Write cfg.checkpoint's model (see the module docstring) to cfg.out; return cfg.out."""
    # ---- Checks: what the checkpoint holds, the base of an adapter, a new output folder
    adapter, base = check_export(cfg)
    checkpoint, out = Path(cfg.checkpoint), Path(cfg.out)

    # ---- The model files into a temporary folder: merged, or copied without the trainer state
    tmp = out.parent / f".{out.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if cfg.merge:
            write_merged(checkpoint, base, tmp)
        else:
            for path in sorted(checkpoint.iterdir()):
                if path.is_file() and path.name not in TRAINER_FILES:
                    shutil.copy2(path, tmp / path.name)
        record = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
        (tmp / EXPORT_CONFIG).write_text(json.dumps({**record, "kind": "merged" if cfg.merge else "adapter" if adapter else "full",
                                                      "base": str(base) if base else None}, indent=2) + "\n")
        os.replace(tmp, out)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = f"{errno.errorcode.get(error.errno, 'error')}: {error.strerror}" if error.errno else str(error)
        raise OSError(f"{out}: could not write the export: {cause}; nothing partial was kept. Free space or fix permissions and rerun.") from error
    return out
