"""`tokenprio train`: stream scored shards and train a student on the weighted loss L = Σ_t Φ_t·ℓ_t / Z.

One entry function, `train(cfg)`, in named phases: set-up (config, processes, device, dtype) → inputs
(shards, Φ spec, student, every check before training) → plan (steps, optimizer, schedule) → start or
resume → the loop → the final checkpoint. Works as one process or under `torchrun` (DDP, or FSDP2 with --fsdp; gloo
on CPU, NCCL on GPU), with full fine-tuning or LoRA adapters (training/strategy.py); SIGTERM/SIGUSR1
save and stop (training/guards.py). See docs/design.md "Loss, normalisation and the output head",
"Data order, distribution and resume" and "Real-size students".
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from scoring.devices import dtype_name, resolve_dtype
from scoring.priority import Priority, default_normalize, parse_priority
from scoring.shards import ShardSet, hold_lock, manifest_checksum, open_shards, write_text_atomic
from scoring.stats import DEFAULT_LOGITS_BUDGET_BYTES, check_head_matches_logits, chunk_rows_for_budget
from training.checkpoint import METRICS_NAME, checkpoint_dir, latest_checkpoint, truncate_metrics
from training.batching import BATCHINGS, Layout
from training.checks import CorpusSummary, check_packed_attention, check_ref_column, check_student, scan_corpus
from training.data import RowGroup, count_micro_batches, iter_epoch, row_groups
from training.distributed import Dist, init_distributed, shutdown
from training.guards import Preempted, check_finite_step, preemption_signals
from training.lora import lora_problems, lora_settings
from training.loss import NORMALIZERS, TokenLoss, normalizer
from training.step import StepResult, StepSettings, accumulate_step, needs_prepass
from training.strategy import Strategy, Student, build_student, grad_norm_value, read_resume_state, restore_trainer_state, save_student

TRAIN_DTYPES = ("float32", "bfloat16")  # autocast dtypes; float16 would need loss scaling
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
    neg_ref: str | None = None  # statistics prefix whose stored log-prob npo, refclip and the anchor compare with; None → "ref"
    npo_beta: float | None = None  # β of neg_loss=npo; None → 1.0
    refclip_nats: float | None = None  # δ of neg_loss=refclip, nats over the reference's NLL; None → 3.0
    anchor_kl: float = 0.0  # α of ASFT's k3 anchor to the --neg-ref log-prob on Φ > 0 tokens (0: off)
    batching: str = "packed"  # packed | grouped | sorted (training/batching.py)
    steps: int | None = None  # optimizer steps; None → `epochs` full passes
    epochs: int = 1  # passes over the corpus when `steps` is None
    lr: float = 3e-4  # peak learning rate (AdamW), after linear warm-up, cosine decay to lr·min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05  # share of the steps spent warming up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    batch_tokens: int = 8192  # tokens per micro-batch incl. padding (packed: sequences × their length; else rows × longest row)
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    seed: int = 0  # data order (and initial weights when `model` has no weights)
    dtype: str = "auto"  # auto | float32 | bfloat16 (autocast; master weights and output layer stay float32)
    save_every: int = 0  # optimizer steps between checkpoints (0: final checkpoint only)
    resume: bool = False  # continue the run in `out` from its latest checkpoint
    window_groups: int = 4  # row groups shuffled together (≈ 1M tokens each): memory vs shuffle quality
    lora_r: int = 0  # LoRA rank (0: full fine-tuning)
    lora_alpha: float | None = None  # LoRA scale α (update (α/r)·BA); None → 2·r
    lora_dropout: float | None = None  # dropout on the adapters' input; None → 0
    lora_targets: str | None = None  # comma-separated module names or all-linear (None); the head's name trains the head in full
    fsdp: bool = False  # FSDP2 sharding over the torchrun processes instead of DDP
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in backward (non-reentrant)


def validate(cfg: TrainConfig) -> list[str]:
    problems = []
    if cfg.normalize is not None and cfg.normalize not in NORMALIZERS:
        problems.append(f"normalize={cfg.normalize!r}: use one of {', '.join(NORMALIZERS)}.")
    loss = loss_of(cfg, vocab_size=2)
    problems += loss.problems(cfg.neg_ref or "ref")
    for name, applies in (("npo_beta", cfg.neg_loss == "npo"), ("refclip_nats", cfg.neg_loss == "refclip"), ("neg_ref", loss.needs_ref)):
        if getattr(cfg, name) is not None and not applies:
            problems.append(f"{name}={getattr(cfg, name)!r} has no effect here (neg_loss={cfg.neg_loss}, anchor_kl={cfg.anchor_kl}); drop it.")
    if cfg.batching not in BATCHINGS:
        problems.append(f"batching={cfg.batching!r}: use one of {', '.join(BATCHINGS)}.")
    if cfg.dtype not in ("auto", *TRAIN_DTYPES):
        problems.append(f"dtype={cfg.dtype!r}: use one of auto, {', '.join(TRAIN_DTYPES)}.")
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
    if cfg.neg_clip_nats is not None and (not cfg.neg_clip_nats > 0 or cfg.neg_loss != "clip"):
        problems.append(f"neg_clip_nats={cfg.neg_clip_nats}: must be > 0 nats, with neg_loss=clip (here {cfg.neg_loss}).")
    if not Path(cfg.model).is_dir() or not (Path(cfg.model) / "config.json").exists():
        problems.append(f"model={cfg.model}: not a Hugging Face model folder (no config.json); pass a local folder saved with save_pretrained.")
    problems += lora_problems(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.lora_r > 0 and Path(cfg.model).is_dir() and not any((Path(cfg.model) / name).exists() for name in WEIGHT_FILES):
        problems.append(f"model={cfg.model}: LoRA adapts saved weights, and this folder has none (config.json only); save the base "
                        "model's weights there, or train it in full (--lora-r 0).")
    return problems


def strategy_of(cfg: TrainConfig) -> Strategy:
    return Strategy(lora=lora_settings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets), fsdp=cfg.fsdp,
                    gradient_checkpointing=cfg.gradient_checkpointing)


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


# ----------------------------------------------------------------------------------------------
# Phases


@dataclass(frozen=True)
class Inputs:
    """Everything `train` checked before its first step: shards, Φ spec, corpus summary and the student."""

    shards: ShardSet
    groups: list[RowGroup]
    priority: Priority
    normalize: str
    summary: CorpusSummary
    layout: Layout  # how windows become micro-batches
    ref_column: str | None  # the --neg-ref log-prob column the loss reads, or None
    tokenizer: object
    model: torch.nn.Module  # float32, on the device
    origin: str  # "loaded" or how it was initialised


def check_inputs(cfg: TrainConfig, device: torch.device) -> Inputs:
    """Open the shards, parse Φ, scan the corpus and load the student; refuse anything that cannot train."""
    from transformers import AutoTokenizer

    shards = open_shards(cfg.shards)
    priority = parse_priority(cfg.priority, available_columns=shards.spec_columns)
    if priority.unresolved_global:
        raise ValueError(
            f"--priority {cfg.priority!r}: {', '.join(priority.unresolved_global)} needs a corpus-wide threshold; resolve it first "
            f"with `tokenprio reweight {cfg.shards} --priority '{cfg.priority}' --out NEW` and train with the spec it records."
        )
    groups = row_groups(shards)
    ref_column = check_ref_column(shards, loss_of(cfg, vocab_size=2), cfg.neg_ref or "ref")
    statistics = tuple(sorted((priority.columns - {"weight", "label"}) | ({ref_column} if ref_column else set())))  # finite at every target
    summary = scan_corpus(shards, groups, read_labels="label" in priority.columns, statistics=statistics)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model, origin = load_student(cfg.model, cfg.seed)
    check_student(shards, tokenizer, model.config, summary, str(cfg.model))
    if summary.max_row_tokens > cfg.batch_tokens:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} is below the longest row ({summary.max_row_tokens} tokens); raise it.")
    model.to(device)
    check_head_matches_logits(model, device)
    if cfg.batching == "packed":
        check_packed_attention(model, device)
    # Packed sequences are as long as the corpus's longest row, so every row fits an empty one.
    layout = Layout(cfg.batching, cfg.batch_tokens, summary.max_row_tokens if cfg.batching == "packed" else 0)
    return Inputs(shards, groups, priority, cfg.normalize or default_normalize(priority), summary, layout, ref_column, tokenizer, model, origin)


def loss_of(cfg: TrainConfig, vocab_size: int) -> TokenLoss:
    """The per-token loss options; clip's c defaults to ln V."""
    defaults = TokenLoss()
    return TokenLoss(neg_loss=cfg.neg_loss, clip_nats=cfg.neg_clip_nats or math.log(vocab_size), anchor_kl=cfg.anchor_kl,
                     npo_beta=defaults.npo_beta if cfg.npo_beta is None else cfg.npo_beta,
                     refclip_nats=defaults.refclip_nats if cfg.refclip_nats is None else cfg.refclip_nats)


@dataclass(frozen=True)
class Plan:
    """The run's length: micro-batches per optimizer step, steps per epoch (a function), total steps."""

    per_step: int  # micro-batches per optimizer step: grad_accum × world size
    total_steps: int
    plan_args: dict  # seed, window_groups, layout: what the data order depends on

    def steps_in_epoch(self, groups: list[RowGroup], epoch: int) -> int:
        """Whole steps only: a final partial step is dropped."""
        return count_micro_batches(groups, epoch=epoch, **self.plan_args) // self.per_step


def make_plan(cfg: TrainConfig, groups: list[RowGroup], world_size: int, layout: Layout) -> Plan:
    plan = Plan(per_step=cfg.grad_accum * world_size, total_steps=0,
                plan_args={"seed": cfg.seed, "window_groups": cfg.window_groups, "layout": layout})
    first_epoch_steps = plan.steps_in_epoch(groups, 0)
    if first_epoch_steps == 0:
        raise ValueError(
            f"{cfg.shards}: one optimizer step needs {plan.per_step} micro-batches (grad_accum × world size) but the corpus makes fewer "
            f"under --batch-tokens {cfg.batch_tokens}; lower --batch-tokens or --grad-accum."
        )
    total = cfg.steps or first_epoch_steps + sum(plan.steps_in_epoch(groups, e) for e in range(1, cfg.epochs))
    return Plan(plan.per_step, total, plan.plan_args)


def run_record(cfg: TrainConfig, extra: dict) -> dict:
    """What `config.json` holds: the config, plus what was decided from it (normaliser, dtype, shards' checksum...)."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    return {"config": config, **extra}


def check_same_run(run: Path, record: dict) -> None:
    """Resume only the same run: equal config (but `resume`) and the same shards (manifest checksum)."""
    saved = json.loads((run / "config.json").read_text())
    before_packing = {"batching": "sorted", "anchor_kl": 0.0}  # what a run saved before these options existed did
    differ = [k for k in record["config"] if k != "resume" and saved["config"].get(k, before_packing.get(k)) != record["config"][k]]
    if saved.get("manifest_checksum") != record["manifest_checksum"]:
        differ.append("shards (manifest checksum)")
    if saved.get("world_size") != record["world_size"]:
        differ.append("world_size")
    if differ:
        raise ValueError(f"{run}: cannot resume, this run was started with other settings ({', '.join(differ)}); use the same options or another --out.")


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, epoch, and steps done in that epoch."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def start_or_resume(run: Path, latest: Path | None, resume_state: dict | None, record: dict, student: Student, optimizer, scheduler,
                    ctx: Dist, say) -> Position:
    """A new run writes config.json; a resumed one restores optimizer, schedule and RNG (its weights are already in
    `student`, restored by build_student before any sharding)."""
    if latest is None:
        if ctx.main:
            run.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run / "config.json", json.dumps(record, indent=2) + "\n")
        return Position()
    restore_trainer_state(resume_state, student, optimizer, scheduler, ctx)
    say(f"resuming {run} from {latest.name} (epoch {resume_state['epoch']}, step {resume_state['step']})")
    if ctx.main:
        truncate_metrics(run, resume_state["step"])
    return Position(resume_state["step"], resume_state["epoch"], resume_state["epoch_step"])


def apply_update(model, optimizer, result: StepResult, z: float, grad_clip: float, ctx: Dist, say, step: int, latest: str) -> float:
    """Scale the summed gradients by W / Z (undoing DDP's and FSDP's mean over W ranks), clip, step. Z = 0: skip.
    A non-finite loss or gradient norm raises guards.Diverged before the step (every rank sees the same sums)."""
    if z == 0:
        say(f"warning: step {step}: the normaliser Z is 0 (no token has Φ ≠ 0 in this global batch); skipping the update.")
        return 0.0
    scale = ctx.world_size / z
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(scale)
    norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    check_finite_step(result.loss_sum / z, norm, step + 1, latest)
    optimizer.step()
    return norm


def step_metrics(result: StepResult, z: float, grad_norm: float, step: int, epoch: int, lr: float, seconds: float) -> dict:
    """One line of metrics.jsonl."""
    counts = result.counts
    return {
        "step": step,
        "epoch": epoch,
        "loss": result.loss_sum / z if z else 0.0,  # Σ w·f(ℓ) / Z over the global batch
        "z": z,
        "lr": lr,
        "grad_norm": grad_norm,
        "targets": counts.tokens,
        "selected_share": counts.selected / max(counts.tokens, 1),
        "nll_positive": result.nll_positive_sum / max(counts.positive, 1),
        "nll_negative": result.nll_negative_sum / max(counts.negative, 1),
        "negative_tokens": counts.negative,
        "clipped_share": result.clipped_tokens / max(counts.negative, 1),
        "input_tokens": result.input_tokens,  # real (unpadded) tokens of the global batch
        "step_seconds": seconds,
        "tokens_per_s": result.input_tokens / seconds,
        "skipped": int(z == 0),
    }


def tensorboard_writer(run: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None (metrics.jsonl always)."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(run / "tensorboard")


# ----------------------------------------------------------------------------------------------
# Entry point


def train(cfg: TrainConfig) -> Path:
    """Train the student in `cfg.model` on the shards in `cfg.shards`; return the final checkpoint folder.

    Every check (config, shards, priority, student, a resumed checkpoint's state) runs before training.
    Raises ValueError / FileNotFoundError subclasses whose message names the field or file and the fix;
    guards.Preempted after saving on SIGTERM/SIGUSR1; guards.Diverged on a non-finite loss, gradient or
    weight (nothing of that step saved); checkpoint.CheckpointWriteError when a checkpoint cannot be written.
    """
    # ---- Set-up: config, processes, device and dtype (resolved once, printed)
    problems = validate(cfg)
    if problems:
        raise TrainConfigError("\n".join(problems))
    ctx = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.fsdp and ctx.world_size < 2:
        raise TrainConfigError("--fsdp shards the student over several processes; start it with torchrun --nproc_per_node N (N ≥ 2).")
    device = torch.device(f"cuda:{ctx.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    compute_dtype, dtype_reason = resolve_dtype(cfg.dtype, device, allowed=TRAIN_DTYPES)
    autocast_dtype = None if compute_dtype == torch.float32 else compute_dtype
    strategy = strategy_of(cfg)
    say = tqdm.write if ctx.main else (lambda _: None)
    run = Path(cfg.out)
    latest = latest_checkpoint(run) if run.exists() else None
    if latest is not None and not cfg.resume:
        raise ValueError(f"{run}: already holds {latest.name}; pass --resume to continue that run, or choose another --out.")
    resume_state = read_resume_state(latest, strategy, ctx) if latest is not None else None  # JSON + safetensors, never a pickle

    # ---- Inputs: shards, Φ spec and student, all checked before any training
    inputs = check_inputs(cfg, device)
    # One writer per run folder, and the folder read again under the lock: a run that saved while this one was loading
    # is never overwritten.
    lock = hold_lock(run / ".lock.train", "tokenprio train", f"run folder {run}") if ctx.main else None
    found = latest_checkpoint(run) if ctx.main else latest
    if found != latest:
        lock.release()
        raise ValueError(f"{run}: another process changed it while this run was starting (latest checkpoint now {found.name if found else 'none'}); "
                         "rerun (with --resume to continue it).")
    priority, normalize = inputs.priority, inputs.normalize
    vocab_size = inputs.model.get_output_embeddings().weight.shape[0]

    # ---- Plan and the run's record (a resumed run must be the same run)
    plan = make_plan(cfg, inputs.groups, ctx.world_size, inputs.layout)
    record = run_record(cfg, {
        "normalize": normalize, "priority_canonical": priority.text, "dtype": f"{dtype_name(compute_dtype)} ({dtype_reason})",
        "world_size": ctx.world_size, "manifest_checksum": manifest_checksum(inputs.shards.manifest), "total_steps": plan.total_steps,
        "student": inputs.origin, "label_names": inputs.summary.label_names, "pack_tokens": inputs.layout.pack_tokens,
        "token_loss": asdict(loss_of(cfg, vocab_size)), "ref_column": inputs.ref_column, "lora": asdict(strategy.lora) if strategy.lora else None,
    })
    if latest is not None:
        check_same_run(run, record)

    # ---- The student as it trains: LoRA adapters, resumed weights, checkpointing, DDP or FSDP (training/strategy.py)
    student = build_student(
        inputs.model, strategy, base_path=cfg.model, seed=cfg.seed, resume_from=latest, ctx=ctx, device=device, compute_dtype=compute_dtype,
        loss_args={"chunk_rows": chunk_rows_for_budget(vocab_size, DEFAULT_LOGITS_BUDGET_BYTES), "autocast_dtype": autocast_dtype,
                   "loss": loss_of(cfg, vocab_size)},
    )
    model = student.model

    # ---- Optimizer and schedule over the trainable parameters; then start or resume
    warmup = int(cfg.warmup_ratio * plan.total_steps)
    optimizer = torch.optim.AdamW(student.trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan.total_steps, warmup, cfg.min_lr_ratio))
    position = start_or_resume(run, latest, resume_state, record, student, optimizer, scheduler, ctx, say)
    trainable = sum(p.numel() for p in student.trainable)  # global sizes (a DTensor shard reports its full shape)
    say(f"student {cfg.model} ({inputs.origin}); device {device}, compute {dtype_name(compute_dtype)} ({dtype_reason}), output layer float32; "
        f"{'LoRA r=' + str(strategy.lora.r) if strategy.lora else 'full fine-tuning'}, {trainable:,} trainable parameters"
        f"{', FSDP' if strategy.fsdp else ', DDP' if ctx.world_size > 1 else ''}{', gradient checkpointing' if strategy.gradient_checkpointing else ''}; "
        f"priority {priority.text!r}, normalize={normalize}, neg_loss={cfg.neg_loss}, anchor_kl={cfg.anchor_kl}; "
        f"{plan.total_steps} steps of {plan.per_step} micro-batches ≤ {cfg.batch_tokens} tokens, batching {cfg.batching}"
        + (f" (sequences of {inputs.layout.pack_tokens} tokens)" if cfg.batching == "packed" else ""))
    settings = StepSettings(
        priority=priority, normalize=normalize, neg_ramp_steps=cfg.neg_ramp,
        prepass=needs_prepass(priority, normalize),
        with_entropy="student_entropy" in priority.student_columns, label_names=inputs.summary.label_names, device=device,
        ref_column=inputs.ref_column,
    )
    columns = sorted(priority.columns | {"weight"} | ({inputs.ref_column} if inputs.ref_column else set()))

    # ---- The loop: one optimizer step per GA × W micro-batches, metrics per step, checkpoints; a signal saves and stops
    writer = tensorboard_writer(run) if ctx.main else None
    bar = tqdm(total=plan.total_steps, initial=position.step, desc="train", unit="step", disable=not ctx.main)
    model.train()
    step, epoch, epoch_step = position.step, position.epoch, position.epoch_step
    last_saved = step if latest is not None else -1
    with preemption_signals() as preemption:
        while step < plan.total_steps:
            epoch_steps = plan.steps_in_epoch(inputs.groups, epoch)
            batches = iter_epoch(inputs.groups, epoch=epoch, columns=columns, label_names=inputs.summary.label_names, rank=ctx.rank,
                                 world_size=ctx.world_size, skip=epoch_step * plan.per_step, stop=epoch_steps * plan.per_step, **plan.plan_args)
            while epoch_step < epoch_steps and step < plan.total_steps:
                started = time.perf_counter()
                result = accumulate_step(student.wrapped, student.core, [next(batches) for _ in range(cfg.grad_accum)], settings, step, ctx)
                z = normalizer(result.counts, normalize)
                latest_name = checkpoint_dir(run, last_saved).name if last_saved > 0 else "none"
                grad_norm = apply_update(model, optimizer, result, z, cfg.grad_clip, ctx, say, step, latest_name)
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
                preempted = preemption.agreed(ctx)  # every rank, every step: all save together or none
                if (cfg.save_every and step % cfg.save_every == 0) or step == plan.total_steps or preempted:
                    counters = {"step": step, "epoch": epoch, "epoch_step": epoch_step}
                    save_student(run, step, student, inputs.tokenizer, optimizer, counters, scheduler, ctx, device)
                    last_saved = step
                if preempted and step < plan.total_steps:
                    bar.close()
                    if writer:
                        writer.close()
                    stop = Preempted(step, checkpoint_dir(run, step))
                    say(str(stop))
                    shutdown(ctx)
                    raise stop
            if epoch_step >= epoch_steps:
                epoch, epoch_step = epoch + 1, 0

    # ---- The final checkpoint is on disk
    bar.close()
    if writer:
        writer.close()
    assert last_saved == step, f"final step {step} was not checkpointed (last {last_saved})"
    shutdown(ctx)
    if lock is not None:
        lock.release()
    return checkpoint_dir(run, step)

