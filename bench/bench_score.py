"""Scoring throughput and peak memory: tokenprio's HF backend vs a bare forward pass, same batches.

    .venv/bin/python bench/bench_score.py [--docs 256] [--rounds 3] [--batch-tokens 8192]

Model: a ~20M-parameter Llama (hidden 256, 4 layers, GPT-2 vocabulary of 50,257) built locally with random
weights; data: the first --docs GSM8K training records (question + answer) of data/gsm8k/train.jsonl,
tokenised with the GPT-2 tokenizer in data/gpt2-tokenizer/. The repository ships 2,000 GSM8K training
records; a larger --docs reads those 2,000 (and says so). Both methods score exactly the same length-sorted
batches. The bare baseline is `model(...).logits` (the full (B, T, V) float32 tensor) followed by one
log-softmax and a gather; tokenprio additionally computes the exact entropy.

Each (method, round) runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own; rounds alternate
the methods to spread machine noise. Prints tokens/s, peak RSS and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def build(docs: int):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(data_path("gpt2-tokenizer"))
    tokenizer.backend_tokenizer.no_truncation()  # this copy was saved with truncation at 50 tokens
    lines = data_path("gsm8k", "train.jsonl").read_text().splitlines()[:docs]  # at most the 2,000 shipped
    windows = []
    for line in lines:
        record = json.loads(line)
        windows.append(tokenizer(record["question"] + "\n" + record["answer"]).input_ids + [tokenizer.eos_token_id])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    return model, windows


def run_one(method: str, docs: int, batch_tokens: int) -> dict:
    import torch

    from scoring.hf_backend import batches_by_tokens, score_windows_hf

    torch.set_num_threads(2)
    model, windows = build(docs)
    device = torch.device("cpu")
    baseline_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_tokens = sum(len(w) for w in windows)
    start = time.perf_counter()
    if method == "tokenprio":
        score_windows_hf(model, windows, device=device, batch_tokens=batch_tokens, logits_budget_bytes=64 * 2**20)
    else:
        with torch.no_grad():
            for batch in batches_by_tokens([len(w) for w in windows], batch_tokens):
                longest = max(len(windows[i]) for i in batch)
                ids = torch.zeros(len(batch), longest, dtype=torch.long)
                mask = torch.zeros(len(batch), longest, dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(windows[i])] = torch.tensor(windows[i])
                    mask[row, : len(windows[i])] = 1
                logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V) float32
                torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
    elapsed_s = time.perf_counter() - start
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "tokens": n_tokens, "seconds": elapsed_s, "tokens_per_s": n_tokens / elapsed_s,
            "peak_rss_mib": peak_rss_kib / 1024, "setup_rss_mib": baseline_rss_kib / 1024,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--one", choices=["tokenprio", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.docs, args.batch_tokens)))
        return

    shipped = len(data_path("gsm8k", "train.jsonl").read_text().splitlines())
    if args.docs > shipped:
        print(f"data/gsm8k/train.jsonl holds {shipped} records; scoring those ({args.docs} asked)")
    results: dict[str, list[dict]] = {"tokenprio": [], "bare": []}
    for round_index in range(args.rounds):
        for method in (("tokenprio", "bare") if round_index % 2 == 0 else ("bare", "tokenprio")):
            cmd = [sys.executable, __file__, "--one", method, "--docs", str(args.docs), "--batch-tokens", str(args.batch_tokens)]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[method].append(json.loads(out))
            r = results[method][-1]
            print(f"round {round_index} {method:9s} {r['tokens_per_s']:8.0f} tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB")

    def best(method, key):
        return max(r[key] for r in results[method]) if key == "tokens_per_s" else min(r[key] for r in results[method])

    ours = results["tokenprio"][0]
    print(f"\nmodel: {ours['params_m']:.1f}M parameters, vocab 50,257; {ours['tokens']} tokens per round; batch_tokens {args.batch_tokens}")
    print(f"tokenprio (logprob + exact entropy): {best('tokenprio', 'tokens_per_s'):.0f} tok/s, peak RSS {best('tokenprio', 'peak_rss_mib'):.0f} MiB")
    print(f"bare forward (logprob only):         {best('bare', 'tokens_per_s'):.0f} tok/s, peak RSS {best('bare', 'peak_rss_mib'):.0f} MiB")
    print(f"throughput ratio tokenprio / bare (best of {args.rounds}): {best('tokenprio', 'tokens_per_s') / best('bare', 'tokens_per_s'):.2f}  (target >= 0.85)")
    print(f"peak RSS ratio tokenprio / bare: {best('tokenprio', 'peak_rss_mib') / best('bare', 'peak_rss_mib'):.2f}")


if __name__ == "__main__":
    main()
