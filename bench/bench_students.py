"""Real-size students on this CPU: full fine-tuning, with activation checkpointing, LoRA r = 16, DDP and FSDP on
2 ranks (and TRL + peft LoRA when trl is installed), on identical global batches; peak RSS per process (per rank
under torchrun) and tokens/s. Then a projected-memory table for 1B and 8B students (arithmetic, see `project`).

    .venv/bin/python bench/bench_students.py [--steps 2] [--rounds 1] [--row-tokens 1024] [--cores 2]
    .venv/bin/python bench/bench_students.py --project       # only the projected-memory table

Model: a ~95M-parameter Llama built from a config (hidden 768, 8 layers, MLP 2048, 12 heads, tied embeddings,
GPT-2 vocabulary of 50,257 from data/gpt2-tokenizer) with random weights, saved once in --work. Data: Tiny
Shakespeare (data/tinyshakespeare) cut into records of 6,000 characters, written as unscored shards by
`tokenprio score --tokenizer ... --long-docs truncate`, so every row has exactly --row-tokens tokens; uniform Φ
(plain SFT on every token), float32. One optimizer step is 2 rows: one process with --grad-accum 2, or 2 ranks
with --grad-accum 1 each; the data order is the same, so every method trains on the same global batches.

Methods, each (method, round) in fresh processes (peak RSS = ru_maxrss of each process, model loading
included; glibc's mmap threshold fixed at 128 KiB so that freed tensors leave RSS), in alternating order
across rounds:
  full       tokenprio train, full fine-tuning, 1 process with --cores threads
  full_ckpt  the same with --gradient-checkpointing
  lora       --lora-r 16 (α 32, every linear layer of the body; the head frozen)
  ddp        torchrun, 2 ranks of --cores/2 threads, DDP (the baseline of FSDP's per-rank memory)
  fsdp       torchrun, 2 ranks, --fsdp
  trl_lora   TRL's SFTTrainer with a peft LoRA of the same shape on the same rows (only when trl is installed)
tokens/s = real tokens of the global batch / step seconds, over the steps after the first (warm-up).
"""

from __future__ import annotations

import argparse
import importlib.util
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
DATA = ROOT / "data"
METHODS = ("full", "lora", "fsdp", "full_ckpt", "ddp", "trl_lora")
DISTRIBUTED = ("ddp", "fsdp")
LORA_R = 16


def data_path(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} is missing: the benchmarks read the data shipped in data/ (see data/README.md); `git checkout -- data`.")
    return path


# ---- set-up: model folder and shards (cached in --work) ------------------------------------------


def llama_config(vocab_size: int, row_tokens: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                       num_key_value_heads=12, max_position_embeddings=row_tokens, tie_word_embeddings=True)


def build_student(work: Path, row_tokens: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = work / "student"
    if (folder / "model.safetensors").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(data_path("gpt2-tokenizer"))
    tokenizer.backend_tokenizer.no_truncation()  # the shipped copy was saved with truncation at 50 tokens
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(len(tokenizer), row_tokens)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_shards(work: Path, row_tokens: int) -> Path:
    from pipelines.score import ScoreConfig, score

    out = work / f"shards-{row_tokens}"
    if (out / "_manifest.json").exists():
        return out
    text = data_path("tinyshakespeare", "input.txt").read_text()
    source = work / "shakespeare.jsonl"
    with open(source, "w") as f:
        for i in range(0, len(text) - 6000, 6000):
            f.write(json.dumps({"id": f"s{i}", "text": text[i : i + 6000]}) + "\n")
    score(ScoreConfig(inputs=(str(source),), out=str(out), tokenizer=str(data_path("gpt2-tokenizer")), max_length=row_tokens,
                      long_docs="truncate"))  # truncate: one row per record, no overlap
    return out


# ---- one measurement (a worker process, or one rank of a torchrun) --------------------------------


def train_config(method: str, shards: Path, student: Path, out: Path, steps: int, row_tokens: int):
    from training.train import TrainConfig

    return TrainConfig(shards=shards, model=student, out=out, priority="uniform", steps=1 + steps, batch_tokens=row_tokens,
                       grad_accum=1 if method in DISTRIBUTED else 2, dtype="float32", lora_r=LORA_R if method == "lora" else 0,
                       fsdp=method == "fsdp", gradient_checkpointing=method == "full_ckpt")


def worker(method: str, work: Path, steps: int, row_tokens: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", "0"))
    shards, student, out = work / f"shards-{row_tokens}", work / "student", work / f"run-{method}"
    if method == "trl_lora":
        result = run_trl_lora(shards, student, work, steps, row_tokens)
    else:
        from training.train import train

        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        train(train_config(method, shards, student, out, steps, row_tokens))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
        result = {"tokens": sum(r["input_tokens"] for r in rows), "seconds": sum(r["step_seconds"] for r in rows)}
    result.update(method=method, rank=rank, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    (work / f"result-{method}-rank{rank}.json").write_text(json.dumps(result))


def run_trl_lora(shards: Path, student: Path, work: Path, steps: int, row_tokens: int) -> dict:
    """TRL's SFTTrainer + peft LoRA (r 16, α 32, all-linear) on the rows tokenprio trains on, in its order, 2 rows per step.
    Not run on the development machine (trl is not installed there)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from scoring.shards import open_shards
    from training.batching import Layout
    from training.data import iter_epoch, row_groups

    batches = iter_epoch(row_groups(open_shards(shards)), seed=0, epoch=0, window_groups=4, layout=Layout("sorted", row_tokens), columns=["weight"],
                         label_names=[], rank=0, world_size=1)
    rows = {"input_ids": [next(batches).input_ids[0].tolist() for _ in range(2 * (1 + steps))]}
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    config = SFTConfig(output_dir=str(work / "trl"), max_steps=1 + steps, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                       learning_rate=3e-4, logging_steps=1000, save_strategy="no", report_to=[], max_length=row_tokens, use_cpu=True,
                       dataloader_num_workers=0, shuffle_dataset=False, gradient_checkpointing=False)
    peft_config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    return {"tokens": 2 * row_tokens * (len(times) - 1), "seconds": times[-1] - times[0]}


# ---- the driver ------------------------------------------------------------------------------------


def measure(method: str, args) -> dict | None:
    """Run one method in fresh processes; tokens/s from rank 0, peak RSS of every process."""
    ranks = 2 if method in DISTRIBUTED else 1
    threads = max(1, args.cores // ranks)
    for stale in args.work.glob(f"result-{method}-rank*.json"):
        stale.unlink()
    script = [__file__, "--worker", method, "--work", str(args.work), "--steps", str(args.steps), "--row-tokens", str(args.row_tokens),
              "--threads", str(threads)]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script] if ranks > 1
               else [sys.executable, *script])
    # A fixed mmap threshold: glibc then returns every large freed block to the system at once, so peak RSS follows the
    # tensors alive at each moment; with its default (a threshold that grows) freed activations stay in the heap and
    # the peak reflects the allocator's history as much as the method.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    found = sorted(args.work.glob(f"result-{method}-rank*.json"))
    if done.returncode != 0 or len(found) != ranks:
        print(f"  {method} failed:\n{done.stderr[-3000:]}")
        return None
    results = [json.loads(p.read_text()) for p in found]
    main = next(r for r in results if r["rank"] == 0)
    result = {"method": method, "tokens_per_s": main["tokens"] / main["seconds"], "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
              "ranks": ranks, "threads": threads, "wall_s": time.perf_counter() - started}
    print(f"  {method:10s} {ranks} × {threads} thread(s): {result['tokens_per_s']:7.1f} tokens/s, peak RSS "
          f"{result['peak_rss_mib']:6.0f} MiB{' per rank (max)' if ranks > 1 else ''}  ({result['wall_s']:.0f} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--row-tokens", type=int, default=1024)
    parser.add_argument("--cores", type=int, default=2, help="threads per method: one process gets all, each of 2 ranks half")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_students")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--project", action="store_true", help="print only the projected-memory table")
    parser.add_argument("--worker", choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker(args.worker, args.work, args.steps, args.row_tokens, args.threads)
        return
    if args.project:
        print_projection()
        return

    # ---- model and shards (cached)
    from transformers import AutoConfig, AutoModelForCausalLM

    args.work.mkdir(parents=True, exist_ok=True)
    student = build_student(args.work, args.row_tokens)
    build_shards(args.work, args.row_tokens)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student)).parameters())
    print(f"student: {n_params / 1e6:.1f}M parameters (tied embeddings), GPT-2 vocabulary; rows of {args.row_tokens} tokens, "
          f"2 rows per step, {args.steps} timed steps; load average {os.getloadavg()[0]:.1f}")
    methods = [m for m in args.methods.split(",") if m]
    if "trl_lora" in methods and importlib.util.find_spec("trl") is None:
        print("trl is not installed: skipping TRL + peft LoRA (pip install trl to include it)")
        methods.remove("trl_lora")

    # ---- rounds, the method order rotated each round
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for round_number in range(args.rounds):
        order = methods[round_number % len(methods):] + methods[: round_number % len(methods)]
        print(f"round {round_number + 1}/{args.rounds}")
        for method in order:
            result = measure(method, args)
            if result:
                results[method].append(result)

    # ---- ratios against the baselines measured in the same run
    def median(method: str, key: str) -> float | None:
        return statistics.median(r[key] for r in results[method]) if results.get(method) else None

    def ratio(a: str, b: str, key: str) -> str:
        x, y = median(a, key), median(b, key)
        return f"{x / y:.2f}" if x and y else "n/a"

    print(f"\nmedians over {args.rounds} round(s) (load average now {os.getloadavg()[0]:.1f}):")
    print(f"  {'method':10s} {'tokens/s':>9s} {'peak RSS MiB':>13s}")
    for m in methods:
        if results[m]:
            print(f"  {m:10s} {median(m, 'tokens_per_s'):9.1f} {median(m, 'peak_rss_mib'):13.0f}")
    print(f"peak RSS: LoRA / full {ratio('lora', 'full', 'peak_rss_mib')} (target ≤ 0.5); FSDP / DDP per rank "
          f"{ratio('fsdp', 'ddp', 'peak_rss_mib')} (target ≤ 0.65); checkpointing / none {ratio('full_ckpt', 'full', 'peak_rss_mib')} "
          f"(target ≤ 0.70 at 1,024-token rows)")
    print(f"tokens/s: LoRA / full {ratio('lora', 'full', 'tokens_per_s')}; checkpointing / none {ratio('full_ckpt', 'full', 'tokens_per_s')}; "
          f"FSDP / DDP {ratio('fsdp', 'ddp', 'tokens_per_s')}; tokenprio LoRA / TRL + peft LoRA {ratio('lora', 'trl_lora', 'tokens_per_s')} "
          "(target ≥ 1.5)")
    print()
    print_projection()


# ---- projected memory for real-size students ------------------------------------------------------

STUDENTS = {  # published shapes: Llama-3.2-1B and Llama-3.1-8B (config.json of meta-llama)
    "1B (Llama-3.2-1B)": {"vocab_size": 128_256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                          "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "8B (Llama-3.1-8B)": {"vocab_size": 128_256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                          "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
}


def project(shape: dict, seq: int = 4096, lora_r: int = LORA_R, world: int = 8) -> dict:
    """Projected training memory in GB (1e9 bytes) of one sequence of `seq` tokens per device.

    N parameters (counted on a meta-device model), N_lora = Σ r·(in + out) over the body's linear layers.
      full fine-tuning   16·N           float32 weights, gradients and AdamW's two moments (4 + 4 + 8 bytes)
      LoRA               4·N + 16·N_lora the frozen base in float32 (as tokenprio keeps it), the adapters' 16 bytes
      FSDP over W ranks  16·N / W + 2·N_layer   each rank's shard, plus one decoder layer all-gathered in bfloat16
      activations        34·s·h·L bytes without checkpointing, 2·s·h·L + 34·s·h with it (bfloat16, batch 1; the sbh·34
                         of Korthikanti et al. 2022, arXiv 2205.05198, Table 2, without the 5·a·s² attention term,
                         which memory-efficient attention kernels do not store; an estimate, Llama's SwiGLU MLP differs)
    The output layer adds nothing here: tokenprio never builds the (s, V) logits (a plain loop would add 8·s·V bytes
    for float32 logits and their gradient).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    n = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    n_lora = sum(lora_r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    n_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    act, act_ckpt = 34 * seq * h * layers, 2 * seq * h * layers + 34 * seq * h
    gb = 1e9
    return {"N": n, "N_lora": n_lora, "full": (16 * n + act) / gb, "full_ckpt": (16 * n + act_ckpt) / gb,
            "lora": (4 * n + 16 * n_lora + act) / gb, "lora_ckpt": (4 * n + 16 * n_lora + act_ckpt) / gb,
            "fsdp": (16 * n / world + 2 * n_layer + act) / gb, "fsdp_ckpt": (16 * n / world + 2 * n_layer + act_ckpt) / gb, "world": world, "seq": seq}


def print_projection() -> None:
    print("projected memory per device (GB), one sequence of 4,096 tokens, bfloat16 activations (formula: bench_students.project):")
    print("| student | parameters | LoRA r=16 parameters | full FT | full FT + ckpt | LoRA | LoRA + ckpt | FSDP ×8 | FSDP ×8 + ckpt |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, shape in STUDENTS.items():
        p = project(shape)
        print(f"| {name} | {p['N'] / 1e9:.2f}B | {p['N_lora'] / 1e6:.1f}M ({100 * p['N_lora'] / p['N']:.2f} %) | {p['full']:.1f} | "
              f"{p['full_ckpt']:.1f} | {p['lora']:.1f} | {p['lora_ckpt']:.1f} | {p['fsdp']:.1f} | {p['fsdp_ckpt']:.1f} |")


if __name__ == "__main__":
    main()
