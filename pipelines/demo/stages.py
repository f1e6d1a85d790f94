"""The studies' stages, each a call of a tokenprio job that does nothing when its output is already there:
models initialised from a config, shards (unscored or scored), second models, Φ resolved by `reweight`,
trained students, and the offline view of which tokens a spec keeps.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.demo.data import build_tokenizer

CONTEXT_TOKENS = 640  # the models' positions: an arithmetic chat is ~130 characters, a text record ≤ 620


@dataclass(frozen=True)
class ModelSize:
    hidden: int  # model width; heads of 64
    layers: int


@dataclass(frozen=True)
class Run:
    """How every training run of a study is configured, apart from its data, start, spec and seed."""

    steps: int
    lr: float = 3e-3  # AdamW peak, warm-up then cosine decay
    batch_tokens: int = 2048  # tokens per optimizer step
    save_every: int = 0  # checkpoints for the learning curves (0: final only)


def init_model(folder: Path, size: ModelSize) -> Path:
    """A Llama config (random init by the trainer from its seed) and the demo's character tokenizer, saved in `folder`."""
    from transformers import LlamaConfig

    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.hidden // 64, num_key_value_heads=size.hidden // 64, max_position_embeddings=CONTEXT_TOKENS,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def score_once(out: Path, inputs: Path, *, model: Path | None = None, tokenizer: Path | None = None) -> Path:
    """Shards of `inputs` scored by `model` as `ref` (unscored, Φ = loss mask, with `tokenizer` alone)."""
    from pipelines.score import ScoreConfig, score
    from scoring.backends import ScorerConfig

    if not (out / "_manifest.json").exists():
        scorer = ScorerConfig(model=str(model)) if model is not None else None
        score(ScoreConfig(inputs=(str(inputs),), out=str(out), scorer=scorer, tokenizer=str(tokenizer) if tokenizer else None,
                          max_length=CONTEXT_TOKENS, n_context=64))
    return out


def add_model_once(out: Path, shards: Path, model: Path, prefix: str) -> Path:
    """`shards` with `model`'s statistics added under `prefix`, as a new folder."""
    from pipelines.add_model import AddModelConfig, add_model
    from scoring.backends import ScorerConfig

    if not (out / "_manifest.json").exists():
        add_model(AddModelConfig(shards=str(shards), scorer=ScorerConfig(model=str(model)), prefix=prefix, out=str(out)))
    return out


def resolved_spec(shards: Path, spec: str, out: Path) -> str:
    """The spec with its global terms resolved over the corpus (reweight writes `out` once)."""
    from pipelines.reweight import ReweightConfig, reweight

    if not (out / "_manifest.json").exists():
        reweight(ReweightConfig(shards=str(shards), priority=spec, out=str(out)))
    return json.loads((out / "_manifest.json").read_text())["config"]["priority"]


def train_once(out: Path, shards: Path, model: Path, spec: str, run: Run, seed: int, **options) -> Path:
    """Train unless `out` holds the final checkpoint of the same config; an interrupted run starts over.

    `options` are further TrainConfig fields (normalize, neg_loss, neg_ref, anchor_kl, ...).
    """
    from training.checkpoint import checkpoint_dir
    from training.train import TrainConfig, train

    cfg = TrainConfig(shards=shards, model=model, out=out, priority=spec, steps=run.steps, seed=seed, lr=run.lr,
                      batch_tokens=run.batch_tokens, save_every=run.save_every, **options)
    saved, final = out / "config.json", checkpoint_dir(out, run.steps)
    same = saved.exists() and json.loads(saved.read_text())["config"] == {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    if same and final.is_dir():
        return final
    shutil.rmtree(out, ignore_errors=True)
    return train(cfg)


def checkpoints(final: Path) -> list[Path]:
    """Every checkpoint of the run that wrote `final`, by step."""
    return sorted(final.parent.glob("checkpoint-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))


def load(checkpoint: Path):
    """A checkpoint in float32, eval mode, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(checkpoint)


def kept_shares(shards: Path, spec: str) -> dict[str, float] | None:
    """Share of target tokens with Φ > 0 per label (`clean` = unlabelled), and of labelled tokens with Φ < 0 (`{label}_negative`).

    None for specs with online terms (Φ depends on the student during training).
    """
    from scoring.priority import evaluate_priority, parse_priority
    from scoring.shards import flat_token_columns, open_shards, read_table

    source = open_shards(shards)
    columns = sorted(source.spec_columns)
    priority = parse_priority(spec, source.spec_columns)
    if priority.online:
        return None
    kept, negative, total, label_names = {}, {}, {}, []
    for path in source.paths:
        tokens, label_names = flat_token_columns(read_table(path, columns=["input_ids", "loss_mask", *columns]), columns, label_names)
        phi = evaluate_priority(priority, tokens, label_names=label_names)  # (N,) float32
        for code, name in enumerate(["clean", *label_names], start=-1):
            where = tokens["loss_mask"] & (tokens["label"] == code)
            kept[name] = kept.get(name, 0) + int((phi[where] > 0).sum())
            negative[name] = negative.get(name, 0) + int((phi[where] < 0).sum())
            total[name] = total.get(name, 0) + int(where.sum())
    shares = {name: kept[name] / total[name] for name in total if total[name]}
    shares |= {f"{name}_negative": negative[name] / total[name] for name in total if total[name] and negative[name]}
    return shares
