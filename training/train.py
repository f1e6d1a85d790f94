"""`tokenprio train`: stream scored shards and train a student on the weighted loss L = Σ_t Φ_t·ℓ_t / Z.

One entry function, `train(cfg)`: set-up and checks → plan, optimizer and resume → loop → final checkpoint.
Works as one process or under `torchrun` (DDP; gloo on CPU, NCCL on GPU); see DESIGN "Loss, normalisation
and the output head" and "Data order, distribution and resume".
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from scoring.priority import default_normalize, parse_priority
from scoring.shards import manifest_checksum, open_shards
from scoring.stats import DEFAULT_LOGITS_BUDGET_BYTES, check_head_matches_logits, chunk_rows_for_budget
from training.checkpoint import (
    METRICS_NAME,
    checkpoint_dir,
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from training.checks import check_student, scan_corpus
from training.data import count_micro_batches, iter_epoch, row_groups
from training.distributed import Dist, barrier, init_distributed, shutdown
from training.loss import COUNT_NAMES, NEG_LOSSES, NORMALIZERS, normalizer
from training.step import StepSettings, StudentLoss, accumulate_step

DTYPES = ("auto", "fp32", "bf16")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class TrainConfigError(ValueError):
    """A TrainConfig that cannot run; the message lists every problem and its fix."""


@dataclass(frozen=True)
class TrainConfig:
    shards: Path  # scored shard folder (part-*.parquet + _manifest.json)
    model: Path  # student: a Hugging Face model folder with its tokenizer (config.json alone: random init from `seed`)
    out: Path  # run folder: config.json, metrics.jsonl, checkpoint-NNNNNN/
    priority: str = "stored"  # Φ spec (docs/priority.md); `stored` = the shards' weight column
    normalize: str | None = None  # Z: tokens | selected | abs_weight | per_sign; None → default_normalize(priority)
    neg_loss: str = "clip"  # loss on Φ < 0 tokens: clip | unlikelihood | none
    neg_clip_nats: float | None = None  # c of neg_loss=clip, nats; None → ln V
    neg_ramp: int = 0  # optimizer steps over which negative Φ ramps linearly from 0 (0: no ramp)
    steps: int | None = None  # optimizer steps; None → `epochs` full passes
    epochs: int = 1  # passes over the corpus when `steps` is None
    lr: float = 3e-4  # peak learning rate (AdamW), after linear warm-up, cosine decay to lr·min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05  # share of the steps spent warming up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    batch_tokens: int = 8192  # padded tokens (rows × longest row) per micro-batch
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    seed: int = 0  # data order (and initial weights when `model` has no weights)
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast; master weights and output layer stay float32)
    save_every: int = 0  # optimizer steps between checkpoints (0: final checkpoint only)
    resume: bool = False  # continue the run in `out` from its latest checkpoint
    window_groups: int = 4  # row groups shuffled together (≈ 1M tokens each): memory vs shuffle quality


def validate(cfg: TrainConfig) -> list[str]:
    problems = []
    if cfg.normalize is not None and cfg.normalize not in NORMALIZERS:
        problems.append(f"normalize={cfg.normalize!r}: use one of {', '.join(NORMALIZERS)}.")
    if cfg.neg_loss not in NEG_LOSSES:
        problems.append(f"neg_loss={cfg.neg_loss!r}: use one of {', '.join(NEG_LOSSES)}.")
    if cfg.dtype not in DTYPES:
        problems.append(f"dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}.")
    for name in ("batch_tokens", "grad_accum", "epochs", "window_groups"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}={getattr(cfg, name)}: must be ≥ 1.")
    for name in ("neg_ramp", "save_every"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name}={getattr(cfg, name)}: must be ≥ 0.")
    if cfg.steps is not None and cfg.steps < 1:
        problems.append(f"steps={cfg.steps}: must be ≥ 1 (or unset to train `epochs` passes).")
    if not cfg.lr > 0 or not 0 <= cfg.warmup_ratio < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"lr={cfg.lr}, warmup_ratio={cfg.warmup_ratio}, min_lr_ratio={cfg.min_lr_ratio}: need lr > 0, 0 ≤ warmup_ratio < 1, 0 ≤ min_lr_ratio ≤ 1.")
    if cfg.neg_clip_nats is not None and not cfg.neg_clip_nats > 0:
        problems.append(f"neg_clip_nats={cfg.neg_clip_nats}: must be > 0 nats.")
    if not Path(cfg.model).is_dir() or not (Path(cfg.model) / "config.json").exists():
        problems.append(f"model={cfg.model}: not a Hugging Face model folder (no config.json); pass a local folder saved with save_pretrained.")
    return problems


def resolve_device(ctx_local_rank: int) -> torch.device:
    return torch.device(f"cuda:{ctx_local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for float32, the reason), decided once."""
    if requested == "fp32":
        return None, "fp32 (requested)"
    if requested == "bf16":
        return torch.bfloat16, "bf16 autocast (requested)"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, f"bf16 autocast (auto: {torch.cuda.get_device_name(device)} supports bf16)"
    return None, f"fp32 (auto: {device.type} device{', no bf16 support' if device.type == 'cuda' else ''})"


def load_student(path: Path, seed: int):
    """The student in float32: its saved weights, or a random initialisation from its config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if any((Path(path) / name).exists() for name in WEIGHT_FILES):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "loaded"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32), f"random init from config.json, seed {seed}"


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_record(cfg: TrainConfig, extra: dict) -> dict:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    return {"config": config, **extra}


def train(cfg: TrainConfig) -> Path:
    """Train the student in `cfg.model` on the shards in `cfg.shards`; return the final checkpoint folder.

    Every check (config, shards, priority, student) runs before training. Raises ValueError /
    FileNotFoundError subclasses whose message names the field or file and the fix.
    """
    # ---- Set-up: config, processes, device and dtype
    problems = validate(cfg)
    if problems:
        raise TrainConfigError("\n".join(problems))
    ctx = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    device = resolve_device(ctx.local_rank)
    autocast_dtype, dtype_reason = resolve_dtype(cfg.dtype, device)
    say = tqdm.write if ctx.main else (lambda _: None)
    run = Path(cfg.out)
    latest = latest_checkpoint(run) if run.exists() else None
    if latest is not None and not cfg.resume:
        raise ValueError(f"{run}: already holds {latest.name}; pass --resume to continue that run, or choose another --out.")

    # ---- Shards, priority and student checks (before any training)
    shards = open_shards(cfg.shards)
    available = set(pq.read_schema(shards.paths[0]).names)
    priority = parse_priority(cfg.priority, available_columns=available)
    if priority.unresolved_global:
        raise ValueError(
            f"--priority {cfg.priority!r}: {', '.join(priority.unresolved_global)} needs a corpus-wide threshold; resolve it first "
            f"with `tokenprio reweight {cfg.shards} --priority '{cfg.priority}' --out NEW` and train with the spec it records."
        )
    normalize = cfg.normalize or default_normalize(priority)
    groups = row_groups(shards)
    summary = scan_corpus(shards, groups, read_labels="label" in priority.columns)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model, origin = load_student(cfg.model, cfg.seed)
    check_student(shards, tokenizer, model.config, summary, str(cfg.model))
    if summary.max_row_tokens > cfg.batch_tokens:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} is below the longest row ({summary.max_row_tokens} tokens); raise it.")
    model.to(device)
    check_head_matches_logits(model, device)
    vocab_size = model.get_output_embeddings().weight.shape[0]

    # ---- Plan, optimizer, schedule, resume
    per_step = cfg.grad_accum * ctx.world_size  # micro-batches per optimizer step
    plan_args = {"seed": cfg.seed, "window_groups": cfg.window_groups, "batch_tokens": cfg.batch_tokens}

    def steps_in_epoch(epoch: int) -> int:  # whole steps only: a final partial step is dropped
        return count_micro_batches(groups, epoch=epoch, **plan_args) // per_step

    first_epoch_steps = steps_in_epoch(0)
    if first_epoch_steps == 0:
        raise ValueError(
            f"{cfg.shards}: one optimizer step needs {per_step} micro-batches (grad_accum × world size) but the corpus makes fewer "
            f"under --batch-tokens {cfg.batch_tokens}; lower --batch-tokens or --grad-accum."
        )
    total_steps = cfg.steps or first_epoch_steps + sum(steps_in_epoch(e) for e in range(1, cfg.epochs))
    warmup = int(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio))
    record = run_record(cfg, {
        "normalize": normalize, "priority_canonical": priority.text, "dtype": dtype_reason, "world_size": ctx.world_size,
        "manifest_checksum": manifest_checksum(shards.manifest), "total_steps": total_steps, "student": origin,
        "label_names": summary.label_names,
    })
    step = epoch = epoch_step = 0
    if latest is not None:
        check_same_run(run, record)
        state = load_trainer_state(latest)
        model.load_state_dict(load_student(latest, cfg.seed)[0].state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        say(f"resuming {run} from {latest.name} (epoch {epoch}, step {step})")
        if ctx.main:
            truncate_metrics(run, step)
    elif ctx.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"student {cfg.model} ({origin}); compute {dtype_reason}; priority {priority.text!r}, normalize={normalize}, "
        f"neg_loss={cfg.neg_loss}; {total_steps} steps of {per_step} micro-batches ≤ {cfg.batch_tokens} tokens")

    core = StudentLoss(model, chunk_rows_for_budget(vocab_size, DEFAULT_LOGITS_BUDGET_BYTES), autocast_dtype,
                       neg_loss=cfg.neg_loss, clip_nats=cfg.neg_clip_nats or math.log(vocab_size))
    student = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None) if ctx.world_size > 1 else core
    global_rho1 = any(args["scope"] == "global" for args in priority.terms("rho1"))
    settings = StepSettings(
        priority=priority, normalize=normalize, neg_ramp_steps=cfg.neg_ramp, prepass=priority.online and (global_rho1 or normalize == "per_sign"),
        with_entropy=bool(priority.terms("student_entropy")), label_names=summary.label_names, device=device,
    )
    columns = sorted(priority.columns | {"weight"})

    # ---- Training loop
    writer = tensorboard_writer(run) if ctx.main else None
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not ctx.main)
    model.train()
    last_saved = step if latest is not None else -1
    while step < total_steps:
        epoch_steps = steps_in_epoch(epoch)
        batches = iter_epoch(groups, epoch=epoch, columns=columns, label_names=summary.label_names, rank=ctx.rank,
                             world_size=ctx.world_size, skip=epoch_step * per_step, stop=epoch_steps * per_step, **plan_args)
        while epoch_step < epoch_steps and step < total_steps:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            result = accumulate_step(student, core, micro_batches, settings, step, ctx)
            z = normalizer(result["counts"], normalize)
            grad_norm = apply_update(model, optimizer, z, cfg.grad_clip, ctx, say, step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, epoch_step = step + 1, epoch_step + 1
            row = step_metrics(result, z, grad_norm, step, epoch, scheduler.get_last_lr()[0], time.perf_counter() - started)
            if ctx.main:
                with open(run / METRICS_NAME, "a") as metrics:
                    metrics.write(json.dumps(row) + "\n")
                if writer:
                    for key, value in row.items():
                        writer.add_scalar(f"train/{key}", value, step)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
                state = {"step": step, "epoch": epoch, "epoch_step": epoch_step, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_state()}
                if ctx.main:
                    save_checkpoint(run, model, tokenizer, state)
                last_saved = step
                barrier(ctx)
        if epoch_step >= epoch_steps:
            epoch, epoch_step = epoch + 1, 0
    bar.close()
    if writer:
        writer.close()
    assert last_saved == step, f"final step {step} was not checkpointed (last {last_saved})"
    shutdown(ctx)
    return checkpoint_dir(run, step)


def check_same_run(run: Path, record: dict) -> None:
    """Resume only the same run: equal config (but `resume`) and the same shards (manifest checksum)."""
    saved = json.loads((run / "config.json").read_text())
    differ = [k for k in record["config"] if k != "resume" and saved["config"].get(k) != record["config"][k]]
    if saved.get("manifest_checksum") != record["manifest_checksum"]:
        differ.append("shards (manifest checksum)")
    if saved.get("world_size") != record["world_size"]:
        differ.append("world_size")
    if differ:
        raise ValueError(f"{run}: cannot resume, this run was started with other settings ({', '.join(differ)}); use the same options or another --out.")


def apply_update(model, optimizer, z: float, grad_clip: float, ctx: Dist, say, step: int) -> float:
    """Scale the summed gradients by W / Z (undoing DDP's mean over W ranks), clip, step. Z = 0: skip."""
    if z == 0:
        say(f"warning: step {step}: the normaliser Z is 0 (no token has Φ ≠ 0 in this global batch); skipping the update.")
        return 0.0
    scale = ctx.world_size / z
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(scale)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return float(norm)


def step_metrics(result: dict, z: float, grad_norm: float, step: int, epoch: int, lr: float, seconds: float) -> dict:
    counts, sums = result["counts"].tolist(), result["sums"].tolist()
    count = dict(zip(COUNT_NAMES, counts))
    return {
        "step": step,
        "epoch": epoch,
        "loss": sums[0] / z if z else 0.0,  # Σ w·f(ℓ) / Z over the global batch
        "z": z,
        "lr": lr,
        "grad_norm": grad_norm,
        "targets": count["tokens"],
        "selected_share": count["selected"] / max(count["tokens"], 1),
        "nll_positive": sums[1] / max(sums[2], 1),
        "nll_negative": sums[3] / max(sums[4], 1),
        "negative_tokens": sums[4],
        "clipped_share": sums[5] / max(sums[4], 1),
        "input_tokens": sums[6],  # real (unpadded) tokens of the global batch
        "step_seconds": seconds,
        "tokens_per_s": sums[6] / seconds,
        "skipped": int(z == 0),
    }


def tensorboard_writer(run: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None (metrics.jsonl always)."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(run / "tensorboard")
