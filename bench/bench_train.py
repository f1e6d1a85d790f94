"""Training throughput and peak memory: tokenprio's trainer vs a bare torch loop vs TRL's SFTTrainer, same batches.

    .venv/bin/python bench/bench_train.py [--steps 4] [--rounds 3] [--batch-tokens 2048] [--records 2000]

Model: an ~11M-parameter Llama (hidden 192, 4 layers, tied embeddings, GPT-2 vocabulary of 50,257) with
random weights; data: the first --records GSM8K question → answer records of data/gsm8k/train.jsonl, tokenised
with the GPT-2 tokenizer in data/gpt2-tokenizer/ by `tokenprio score --tokenizer` (unscored shards, loss on
the answer), plus a copy with random signed Φ. The repository ships 2,000 GSM8K training records (the default
--records); a larger --records reads those 2,000 (and says so).

All methods see the same padded, length-sorted micro-batches (`--batching sorted`; bench/bench_batching.py compares
the batchings). Methods, each (method, round) in a fresh subprocess so its peak RSS (ru_maxrss) is its own, alternating:
  tokenprio_weighted  `train()` with --priority stored on random signed Φ (per_sign, neg-loss clip)
  tokenprio_uniform   `train()` with --priority uniform on the same shards (ordinary SFT)
  bare                the same micro-batches: model(...).logits over all positions, masked cross-entropy,
                      backward, gradient clipping, AdamW (batches built before the clock starts)
  trl                 TRL's SFTTrainer on the same rows, in their order, completion-only loss, its default loss
                      (chunked NLL), gradient checkpointing off (when trl is installed; imported lazily)
Throughput = real (unpadded) input tokens per second over the steps after the first, by wall clock and by
process CPU time (steadier when other jobs share the cores). Then the three steps alternate batch by batch
in one process, and the weighted run is repeated on a corpus ten times larger (same steps) for peak RSS.
`--threads` defaults to 1: with 2 threads on cores other jobs also use, every small elementwise op of the
transformer waits at an OpenMP barrier for a descheduled thread, which inflates the body of all methods alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the repository's data/ folder (see data/README.md)


def data_path(*parts: str) -> Path:
    """A file or folder under data/, or a clear error naming what is missing (nothing is downloaded)."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} is missing: the benchmarks read the data shipped in the repository's data/ folder "
                         f"(see data/README.md); restore it with `git checkout -- data`.")
    return path


METHODS = ("tokenprio_weighted", "tokenprio_uniform", "bare", "trl")


# ---- set-up: tokenizer, model folder, shards ------------------------------------------------------


def build_model_folder(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = work / "student"
    if (folder / "model.safetensors").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(data_path("gpt2-tokenizer"))
    tokenizer.backend_tokenizer.no_truncation()  # this copy was saved with truncation at 50 tokens
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=1024, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_shards(work: Path, records: int, copies: int, name: str) -> Path:
    """Unscored shards of `copies` × `records` GSM8K records (ids made unique per copy)."""
    from pipelines.score import ScoreConfig, score
    from scoring.inputs import FieldNames

    out = work / name
    if (out / "_manifest.json").exists():
        return out
    lines = data_path("gsm8k", "train.jsonl").read_text().splitlines()[:records]  # at most the 2,000 shipped
    if len(lines) < records:
        print(f"data/gsm8k/train.jsonl holds {len(lines)} records; using those ({records} asked)")
    source = work / f"{name}.jsonl"
    with open(source, "w") as f:
        for copy in range(copies):
            for i, line in enumerate(lines):
                record = json.loads(line)
                f.write(json.dumps({"id": f"{copy}-{i}", "question": record["question"] + "\n", "answer": record["answer"]}) + "\n")
    score(ScoreConfig(inputs=(str(source),), out=str(out), tokenizer=str(data_path("gpt2-tokenizer")),
                      fields=FieldNames(prompt="question", completion="answer"), max_length=1024, records_per_shard=5000))
    return out


def signed_copy(source: Path, out: Path, seed: int = 0) -> Path:
    """The same shards with Φ ~ U(0, 2) on targets and 15 % of targets at −1 (shard by shard, streaming)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from scoring.shards import MANIFEST_NAME, build_manifest, load_manifest, shard_paths, write_json_atomic, write_shard_file

    if (out / MANIFEST_NAME).exists():
        return out
    manifest = load_manifest(source)
    rng = np.random.default_rng(seed)
    entries = []
    for entry, path in zip(sorted(manifest["shards"], key=lambda s: s["index"]), shard_paths(source, manifest)):
        table = pq.read_table(path)
        mask = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False)
        phi = rng.uniform(0.0, 2.0, len(mask)).astype(np.float32)
        phi[rng.random(len(mask)) < 0.15] = -1.0
        phi[~mask] = 0.0
        offsets = np.concatenate([[0], np.cumsum(table.column("n_tokens").to_numpy())]).astype(np.int32)
        weight = pa.ListArray.from_arrays(pa.array(offsets), pa.array(phi))
        table = table.set_column(table.schema.get_field_index("weight"), table.schema.field("weight"), weight)
        entries.append(write_shard_file(table, out, entry["index"]))
    write_json_atomic(out / MANIFEST_NAME, build_manifest(entries, manifest["metadata"]))
    return out


# ---- one measurement per subprocess ----------------------------------------------------------------


def plan_batches(shards: Path, steps: int, batch_tokens: int):
    """The micro-batches tokenprio's trainer consumes in its first `steps` steps (grad_accum 1, one process)."""
    from scoring.shards import open_shards
    from training.batching import Layout
    from training.data import iter_epoch, row_groups

    groups = row_groups(open_shards(shards))
    # --batching sorted (padded rows), as in the train() runs below: every method sees the same padded micro-batches.
    batches = iter_epoch(groups, seed=0, epoch=0, window_groups=4, layout=Layout("sorted", batch_tokens), columns=["weight"],
                         label_names=[], rank=0, world_size=1)
    return [next(batches) for _ in range(steps)]


def run_tokenprio(shards: Path, model: Path, out: Path, priority: str, steps: int, batch_tokens: int) -> dict:
    """Wall time from the trainer's per-step metrics (steps after the first); CPU time as the difference of a
    1-step run and a (1 + steps)-step run, whose set-up costs are the same."""
    from training.train import TrainConfig, train

    cpu = []
    for name, n in (("short", 1), ("long", 1 + steps)):
        shutil.rmtree(out / name, ignore_errors=True)
        started = time.process_time()
        train(TrainConfig(shards=shards, model=model, out=out / name, priority=priority, steps=n, batch_tokens=batch_tokens, dtype="float32",
                          batching="sorted"))
        cpu.append(time.process_time() - started)
    rows = [json.loads(line) for line in (out / "long" / "metrics.jsonl").read_text().splitlines()][1:]
    return {"tokens": sum(r["input_tokens"] for r in rows), "seconds": sum(r["step_seconds"] for r in rows), "cpu_seconds": cpu[1] - cpu[0]}


def run_bare(shards: Path, model_dir: Path, steps: int, batch_tokens: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    batches = plan_batches(shards, 1 + steps, batch_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    tokens = seconds = cpu_seconds = 0.0
    for i, mb in enumerate(batches):  # the first step (warm-up) is not timed, as in the trainer's runs
        labels = torch.full(mb.input_ids.shape, -100)
        flat = torch.zeros(mb.input_ids.numel(), dtype=torch.bool)
        flat[mb.hidden_index + 1] = mb.tokens["loss_mask"]
        labels.view(-1)[flat] = mb.input_ids.view(-1)[flat]
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, T, V) float32
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i > 0:
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - start_cpu
            tokens += mb.targets.numel()
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds}


def run_trl(shards: Path, model_dir: Path, work: Path, steps: int, batch_tokens: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    batches = plan_batches(shards, 1 + steps, batch_tokens)
    rows = {"input_ids": [], "completion_mask": []}
    for mb in batches:
        lengths = mb.attention_mask.sum(1).tolist()
        start = 0
        for b, n in enumerate(lengths):
            rows["input_ids"].append(mb.input_ids[b, :n].tolist())
            rows["completion_mask"].append(mb.tokens["loss_mask"][start : start + n].int().tolist())
            start += n
    per_batch = max(1, round(len(rows["input_ids"]) / len(batches)))
    times, cpu_times = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())
            cpu_times.append(time.process_time())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTConfig(output_dir=str(work / "trl"), max_steps=1 + steps, per_device_train_batch_size=per_batch, learning_rate=3e-4,
                       logging_steps=1000, save_strategy="no", report_to=[], completion_only_loss=True, max_length=1024,
                       use_cpu=True, dataloader_num_workers=0, shuffle_dataset=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    n_steps = len(times) - 1
    tokens = sum(len(ids) for ids in rows["input_ids"][per_batch : per_batch * (n_steps + 1)])
    return {"tokens": tokens, "seconds": times[-1] - times[0], "cpu_seconds": cpu_times[-1] - cpu_times[0]}


def run_alternating_steps(shards: Path, model_dir: Path, steps: int, batch_tokens: int, repeats: int) -> dict:
    """One process, three model copies: per batch, a tokenprio weighted step, a tokenprio unweighted step and a
    bare step in turn (order rotated each repeat), each with gradient clipping and AdamW. Pairs of steps on
    the same batch under the same machine load give steadier ratios than separate runs. Step seconds per method."""
    import math

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from scoring.priority import default_normalize, parse_priority
    from scoring.stats import DEFAULT_LOGITS_BUDGET_BYTES, chunk_rows_for_budget
    from training.distributed import Dist
    from training.loss import TokenLoss, normalizer
    from training.step import StepSettings, StudentLoss, accumulate_step
    from training.train import apply_update

    batches = plan_batches(shards, steps, batch_tokens)
    one = Dist(rank=0, world_size=1, local_rank=0)
    models = {m: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train() for m in ("weighted", "uniform", "bare")}
    optimizers = {m: torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95)) for m, model in models.items()}
    vocab = models["bare"].config.vocab_size
    chunk_rows = chunk_rows_for_budget(vocab, DEFAULT_LOGITS_BUDGET_BYTES)

    def tokenprio_step(name: str, spec: str, mb) -> None:
        priority = parse_priority(spec)
        settings = StepSettings(priority=priority, normalize=default_normalize(priority), neg_ramp_steps=0, prepass=False,
                                with_entropy=False, label_names=[], device=torch.device("cpu"))
        core = StudentLoss(models[name], chunk_rows, None, TokenLoss(neg_loss="clip", clip_nats=math.log(vocab)))
        result = accumulate_step(core, core, [mb], settings, 0, one)
        apply_update(models[name], optimizers[name], result, normalizer(result.counts, settings.normalize), 1.0, one, print, 0, "none")
        optimizers[name].zero_grad(set_to_none=True)

    def bare_step(mb) -> None:
        labels = torch.full(mb.input_ids.shape, -100)
        flat = torch.zeros(mb.input_ids.numel(), dtype=torch.bool)
        flat[mb.hidden_index + 1] = mb.tokens["loss_mask"]
        labels.view(-1)[flat] = mb.input_ids.view(-1)[flat]
        logits = models["bare"](input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).backward()
        torch.nn.utils.clip_grad_norm_(models["bare"].parameters(), 1.0)
        optimizers["bare"].step()
        optimizers["bare"].zero_grad(set_to_none=True)

    runs = {"weighted": lambda mb: tokenprio_step("weighted", "stored", mb), "uniform": lambda mb: tokenprio_step("uniform", "uniform", mb), "bare": bare_step}
    for run in runs.values():  # warm-up
        run(batches[0])
    seconds = {name: [] for name in runs}
    order = list(runs)
    for repeat in range(repeats):
        for mb in batches:
            for name in order:
                started = time.perf_counter()
                runs[name](mb)
                seconds[name].append(time.perf_counter() - started)
        order = order[1:] + order[:1]
    return {"seconds": seconds, "tokens": [mb.targets.numel() for mb in batches] * repeats}


def worker(method: str, work: Path, shards_name: str, steps: int, batch_tokens: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    shards, model = work / shards_name, work / "student"
    if method == "alternating":
        print("RESULT " + json.dumps(run_alternating_steps(shards, model, steps, batch_tokens, repeats=3)))
        return
    if method == "tokenprio_weighted":
        result = run_tokenprio(shards, model, work / f"run_{method}_{shards_name}", "stored", steps, batch_tokens)
    elif method == "tokenprio_uniform":
        result = run_tokenprio(shards, model, work / f"run_{method}_{shards_name}", "uniform", steps, batch_tokens)
    elif method == "bare":
        result = run_bare(shards, model, steps, batch_tokens)
    else:
        result = run_trl(shards, model, work, steps, batch_tokens)
    result.update(method=method, shards=shards_name, tokens_per_s=result["tokens"] / result["seconds"],
                  tokens_per_cpu_s=result["tokens"] / result["cpu_seconds"],
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


# ---- driver ---------------------------------------------------------------------------------------


def measure(method: str, work: Path, shards_name: str, args) -> dict | None:
    command = [sys.executable, __file__, "--worker", method, "--shards-name", shards_name, "--work", str(work),
               "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{method} failed:\n{done.stderr[-2000:]}")
        return None
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"  {method:20s} {shards_name:10s} {result['tokens_per_s']:7.0f} tokens/s (wall) {result['tokens_per_cpu_s']:7.0f} tokens/CPU-s"
          f"  peak RSS {result['peak_rss_mib']:6.0f} MiB")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_train")
    parser.add_argument("--worker", choices=(*METHODS, "alternating"))
    parser.add_argument("--shards-name", default="signed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: no OpenMP barrier stalls when other jobs share the cores)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker(args.worker, args.work, args.shards_name, args.steps, args.batch_tokens, args.threads)
        return

    # ---- data and model (cached in --work)
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM

    args.work.mkdir(parents=True, exist_ok=True)
    student = build_model_folder(args.work)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student)).parameters())
    print(f"student: {n_params / 1e6:.1f}M parameters (tied embeddings), GPT-2 vocabulary")
    signed_copy(build_shards(args.work, args.records, 1, "plain"), args.work / "signed")
    signed_copy(build_shards(args.work, args.records, 10, "plain10"), args.work / "signed10")
    methods = [m for m in METHODS if m != "trl" or importlib.util.find_spec("trl")]
    if "trl" not in methods:
        print("trl is not installed: skipping TRL (pip install trl to include it)")

    # ---- alternating rounds on the 1× corpus, then the weighted run on the 10× corpus
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for round_number in range(args.rounds):
        print(f"round {round_number + 1}/{args.rounds}")
        for method in methods:
            result = measure(method, args.work, "signed", args)
            if result:
                results[method].append(result)
    # ---- one process alternating the three steps batch by batch (steadier ratios on a loaded machine)
    command = [sys.executable, __file__, "--worker", "alternating", "--shards-name", "signed", "--work", str(args.work),
               "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens), "--threads", str(args.threads)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    alternating = json.loads(lines[-1][len("RESULT ") :]) if lines else None
    if alternating is None:
        print(f"alternating steps failed:\n{finished.stderr[-2000:]}")
    large = [r for r in (measure("tokenprio_weighted", args.work, "signed10", args) for _ in range(args.rounds)) if r]

    # ---- summary: medians over rounds; CPU-time throughput is steadier on a shared machine
    def median(method: str, key: str, runs=results) -> float:
        return statistics.median(r[key] for r in runs[method])

    done = [m for m in methods if results[m]]
    print(f"\nmedian over {args.rounds} rounds, {args.threads} thread(s) per process (load average {os.getloadavg()[0]:.1f}):")
    print(f"  {'method':20s} {'tokens/s':>9s} {'tokens/CPU-s':>13s} {'peak RSS MiB':>13s}")
    for m in done:
        print(f"  {m:20s} {median(m, 'tokens_per_s'):9.0f} {median(m, 'tokens_per_cpu_s'):13.0f} {median(m, 'peak_rss_mib'):13.0f}")
    for key, unit in (("tokens_per_s", "wall"), ("tokens_per_cpu_s", "CPU")):
        def ratio(a: str, b: str, key: str = key) -> float:
            return median(a, key) / median(b, key)

        line = f"[{unit}] tokenprio/bare {ratio('tokenprio_uniform', 'bare'):.2f}x (weighted {ratio('tokenprio_weighted', 'bare'):.2f}x; target >= 1.2x)"
        if "trl" in done:
            line += f"; tokenprio/TRL {ratio('tokenprio_uniform', 'trl'):.2f}x (target >= 1.7x)"
        line += f"; weighted {100 * (1 - ratio('tokenprio_weighted', 'tokenprio_uniform')):+.1f}% slower than unweighted (target <= 3%)"
        print(line)
    if alternating:
        seconds, tokens = alternating["seconds"], alternating["tokens"]

        def paired(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

        rates = {m: sum(tokens) / sum(s) for m, s in seconds.items()}
        print(f"alternating steps in one process ({len(tokens)} batches each): tokens/s weighted {rates['weighted']:.0f}, "
              f"unweighted {rates['uniform']:.0f}, bare {rates['bare']:.0f}; median paired time ratios: bare/tokenprio "
              f"{paired('bare', 'uniform'):.2f}x (weighted {paired('bare', 'weighted'):.2f}x), weighted/unweighted "
              f"{paired('weighted', 'uniform'):.3f}")
    if large:
        big, small = statistics.median(r["peak_rss_mib"] for r in large), median("tokenprio_weighted", "peak_rss_mib")
        print(f"peak RSS of the weighted run, 10x corpus vs 1x: {big:.0f} vs {small:.0f} MiB ({100 * (big / small - 1):+.1f}%; target within 5%)")


if __name__ == "__main__":
    main()
