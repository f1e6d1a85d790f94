"""Packed vs grouped vs sorted micro-batches (`tokenprio train --batching`): training tokens/s and padding share.

    .venv/bin/python bench/bench_batching.py [--steps 6] [--rounds 3] [--batch-tokens 4096] [--threads 1]

Data and model are bench_train.py's: the first --records GSM8K question → answer records of data/gsm8k/train.jsonl
as unscored shards (loss on the answer, GPT-2 tokenizer), and an 11.4M-parameter Llama (hidden 192, 4 layers,
tied embeddings, GPT-2 vocabulary, sdpa attention) with random weights; uniform Φ.

For each batching the epoch's plan gives the padding share (1 − real tokens / B·T summed over every micro-batch of
the epoch) and how mixed the micro-batches are (the median over micro-batches of longest / shortest row). Then
three copies of the model (same initial weights, one AdamW each) take optimizer steps in one process, alternating
packed, grouped and sorted step by step (the order rotates every round), each on its own batching's next
micro-batch, through the trainer's own step (training.step.accumulate_step, training.train.apply_update). The
first step of each is a warm-up and not timed. Throughput = real (unpadded) tokens / seconds over the timed steps,
by wall clock and by process CPU time; ratios are against sorted measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHINGS = ("packed", "grouped", "sorted")


def plan_summary(groups, layout, window_groups: int) -> dict:
    """Padding share and row-length spread of every micro-batch of epoch 0 (reads only n_tokens)."""
    import numpy as np

    from training.data import epoch_windows, read_groups, window_plan

    real = padded = 0
    spreads, per_batch = [], []
    for number, window in enumerate(epoch_windows(len(groups), 0, 0, window_groups)):
        n_tokens = read_groups([groups[g] for g in window], ["n_tokens"]).column("n_tokens").to_numpy()
        for bucket in window_plan(groups, window, 0, 0, number, layout):
            lengths = n_tokens[bucket.rows]
            if bucket.sequence is None:
                size = len(lengths) * int(lengths.max())
            else:
                size = (int(bucket.sequence[-1]) + 1) * int(np.bincount(bucket.sequence, weights=lengths).max())
            real, padded = real + int(lengths.sum()), padded + size
            spreads.append(float(lengths.max() / lengths.min()))
            per_batch.append(len(lengths))
    return {"padding_share": 1 - real / padded, "micro_batches": len(spreads), "median_spread": statistics.median(spreads),
            "median_rows": statistics.median(per_batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batching per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_train", help="shared with bench_train.py (cached shards and model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP barrier stalls when other jobs share the cores)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))

    import torch
    from transformers import AutoModelForCausalLM

    from bench_train import build_model_folder, build_shards
    from scoring.priority import parse_priority
    from scoring.shards import open_shards
    from scoring.stats import DEFAULT_LOGITS_BUDGET_BYTES, chunk_rows_for_budget
    from training.batching import Layout
    from training.checks import check_packed_attention
    from training.data import iter_epoch, read_groups, row_groups
    from training.distributed import Dist
    from training.loss import TokenLoss, normalizer
    from training.step import StepSettings, StudentLoss, accumulate_step
    from training.train import apply_update

    torch.set_num_threads(args.threads)

    # ---- data, model, layouts (packed sequences as long as the corpus's longest row, as the trainer does)
    args.work.mkdir(parents=True, exist_ok=True)
    student = build_model_folder(args.work)
    groups = row_groups(open_shards(build_shards(args.work, args.records, 1, "plain")))
    longest = max(int(read_groups([g], ["n_tokens"]).column("n_tokens").to_numpy().max()) for g in groups)
    layouts = {b: Layout(b, args.batch_tokens, longest if b == "packed" else 0) for b in BATCHINGS}
    window_groups = 4
    print(f"{args.records} GSM8K records, longest row {longest} tokens; --batch-tokens {args.batch_tokens}; {args.threads} torch thread(s)")
    summaries = {b: plan_summary(groups, layouts[b], window_groups) for b in BATCHINGS}
    for b, s in summaries.items():
        print(f"  {b:8s} {s['micro_batches']:4d} micro-batches/epoch, padding {100 * s['padding_share']:5.1f} %, median rows per micro-batch "
              f"{s['median_rows']:.0f}, median longest/shortest row {s['median_spread']:.2f}")

    # ---- three students, one per batching, alternating step by step through the trainer's step
    one = Dist(rank=0, world_size=1, local_rank=0)
    priority = parse_priority("uniform")
    settings = StepSettings(priority=priority, normalize="tokens", neg_ramp_steps=0, prepass=False, with_entropy=False,
                            label_names=[], device=torch.device("cpu"))
    models = {b: AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train() for b in BATCHINGS}
    check_packed_attention(models["packed"], torch.device("cpu"))
    vocab = models["sorted"].config.vocab_size
    cores = {b: StudentLoss(m, chunk_rows_for_budget(vocab, DEFAULT_LOGITS_BUDGET_BYTES), None, TokenLoss()) for b, m in models.items()}
    optimizers = {b: torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95)) for b, m in models.items()}
    streams = {b: iter_epoch(groups, seed=0, epoch=0, window_groups=window_groups, layout=layouts[b], columns=["weight"], label_names=[],
                             rank=0, world_size=1) for b in BATCHINGS}

    def step(b: str) -> tuple[float, float, int]:
        mb = next(streams[b])
        started, started_cpu = time.perf_counter(), time.process_time()
        result = accumulate_step(cores[b], cores[b], [mb], settings, 0, one)
        apply_update(models[b], optimizers[b], normalizer(result.counts, "tokens"), 1.0, one, print, 0)
        optimizers[b].zero_grad(set_to_none=True)
        return time.perf_counter() - started, time.process_time() - started_cpu, mb.targets.numel()

    for b in BATCHINGS:
        step(b)  # warm-up
    totals = {b: [0.0, 0.0, 0] for b in BATCHINGS}
    order = list(BATCHINGS)
    for round_number in range(args.rounds):
        for _ in range(args.steps):
            for b in order:
                wall, cpu, tokens = step(b)
                totals[b] = [totals[b][0] + wall, totals[b][1] + cpu, totals[b][2] + tokens]
        rates = {b: totals[b][2] / totals[b][0] for b in BATCHINGS}
        print(f"round {round_number + 1}/{args.rounds}: cumulative tokens/s " + ", ".join(f"{b} {rates[b]:.0f}" for b in BATCHINGS))
        order = order[1:] + order[:1]

    # ---- summary: ratios against sorted, measured in the same run
    print(f"\n{args.rounds} rounds × {args.steps} steps per batching (load average now {__import__('os').getloadavg()[0]:.1f}):")
    print(f"  {'batching':8s} {'tokens/s':>9s} {'tokens/CPU-s':>13s} {'padding %':>10s} {'vs sorted (wall)':>17s} {'(CPU)':>7s}")
    base_wall, base_cpu = totals["sorted"][2] / totals["sorted"][0], totals["sorted"][2] / totals["sorted"][1]
    for b in BATCHINGS:
        wall, cpu = totals[b][2] / totals[b][0], totals[b][2] / totals[b][1]
        print(f"  {b:8s} {wall:9.0f} {cpu:13.0f} {100 * summaries[b]['padding_share']:10.1f} {wall / base_wall:16.2f}x {cpu / base_cpu:6.2f}x")


if __name__ == "__main__":
    main()
