"""GPU scoring check: HF vs vLLM (exact entropy) throughput, peak memory and parity on one long document.

    .venv/bin/python bench/gpu_score.py [--tokens 131072] [--window 8192] [--rounds 2] [--vllm-memory 0.3]

Needs a CUDA GPU and the official vllm (`make install` on a GPU machine installs the [vllm] extra).
Nothing is downloaded: a ~1.2B-parameter Llama with random weights (hidden 2048, 16 layers, 16 heads of
128 with 8 KV heads, vocabulary 128,256, like Llama 3) is built on the GPU and saved in bfloat16 with a
synthetic word-level tokenizer of the same size. The "document" is `--tokens` random ids cut into windows
of `--window` tokens (no overlap: throughput only).

Each method runs in its own subprocess (so memory is its own):
  hf    scoring.hf_backend.score_windows_hf, bfloat16 weights, float32 output layer in 256 MiB chunks;
        peak memory = torch.cuda.max_memory_allocated
  vllm  scoring.vllm_backend (exact entropy, pooling plugin), bfloat16 weights, float32 output layer;
        memory = device memory in use while the engine is up (vLLM reserves --vllm-memory of the GPU
        up front, KV cache included; plus the driver's CUDA context), and the runner it used (V2 or V1). If the default runner fails,
        it is retried once with VLLM_USE_V2_MODEL_RUNNER=0.
Prints tokens/s (best of the rounds, after one warm-up window), memory, and max |Δ| between the two
backends' log-probs and entropies (bfloat16 weights: expect ~1e-2, not the float32 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128_256


def build_model_folder(folder: Path, window: int) -> None:
    """Random-weight ~1.2B Llama (bfloat16 safetensors) and a word-level tokenizer of the same vocabulary."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=window,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    words = {f"w{i}": i for i in range(VOCAB - 3)} | {"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def make_windows(tokens: int, window: int) -> list[list[int]]:
    ids = np.random.default_rng(0).integers(0, VOCAB - 3, size=tokens)
    return [ids[i : i + window].tolist() for i in range(0, tokens, window)]


def run_hf(folder: Path, windows: list[list[int]], rounds: int) -> tuple[dict, list]:
    import torch

    from scoring.hf_backend import load_hf_model, score_windows_hf

    device = torch.device("cuda")
    model = load_hf_model(str(folder), revision=None, dtype=torch.bfloat16, device=device)

    def run(batch):
        return score_windows_hf(model, batch, device=device, batch_tokens=16_384, logits_budget_bytes=256 * 2**20)

    run(windows[:1])  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        stats = run(windows)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"seconds": min(seconds), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}, stats


def run_vllm(folder: Path, windows: list[list[int]], rounds: int, window: int, memory: float) -> tuple[dict, list]:
    import torch

    from scoring.vllm_backend import load_vllm_engine, score_windows_vllm

    engine = load_vllm_engine(str(folder), dtype="bfloat16", max_model_len=window, tensor_parallel_size=1,
                              gpu_memory_utilization=memory, entropy="exact", seed=0)
    score_windows_vllm(engine, windows[:1])  # warm-up
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        stats = score_windows_vllm(engine, windows)
        seconds.append(time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    runner = "V2" if engine.llm.llm_engine.vllm_config.use_v2_model_runner else "V1"
    return {"seconds": min(seconds), "in_use_gib": (total - free) / 2**30, "runner": runner}, stats


def child(args) -> None:
    folder, out = Path(args.folder), Path(args.out)
    if args.one == "build":
        build_model_folder(folder, args.window)
        return
    windows = make_windows(args.tokens, args.window)
    if args.one == "hf":
        result, stats = run_hf(folder, windows, args.rounds)
    else:
        result, stats = run_vllm(folder, windows, args.rounds, args.window, args.vllm_memory)
    np.savez(out / f"{args.one}.npz", logprob=np.concatenate([s[0] for s in stats]), entropy=np.concatenate([s[1] for s in stats]))
    (out / f"{args.one}.json").write_text(json.dumps(result | {"tokens": args.tokens}))


def launch(method: str, args, folder: Path, env: dict) -> bool:
    cmd = [sys.executable, __file__, "--one", method, "--folder", str(folder), "--out", str(folder),
           "--tokens", str(args.tokens), "--window", str(args.window), "--rounds", str(args.rounds),
           "--vllm-memory", str(args.vllm_memory)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{method} failed (exit {result.returncode}); last output:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131_072, help="tokens in the long document")
    parser.add_argument("--window", type=int, default=8192, help="tokens per window (= vLLM max_model_len)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vllm-memory", type=float, default=0.3, help="vLLM gpu_memory_utilization")
    parser.add_argument("--one", choices=["build", "hf", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return

    # ---- model, then each backend, each in its own process (this one never touches the GPU)
    folder = Path(tempfile.mkdtemp(prefix="gpu_score_"))
    env = dict(os.environ)
    start = time.perf_counter()
    if not launch("build", args, folder, env):
        return
    print(f"model folder {folder} built in {time.perf_counter() - start:.0f} s")
    ok = {"hf": launch("hf", args, folder, env)}
    ok["vllm"] = launch("vllm", args, folder, env)
    if not ok["vllm"]:
        print("retrying vLLM with the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        ok["vllm"] = launch("vllm", args, folder, env | {"VLLM_USE_V2_MODEL_RUNNER": "0"})

    # ---- summary
    results = {m: json.loads((folder / f"{m}.json").read_text()) for m in ok if ok[m]}
    print(f"\n{args.tokens} tokens in windows of {args.window}; ~1.2B Llama, vocab {VOCAB}, bfloat16 weights, float32 head")
    if "hf" in results:
        r = results["hf"]
        print(f"hf    {args.tokens / r['seconds']:9.0f} tok/s   peak allocated {r['peak_gib']:.1f} GiB")
    if "vllm" in results:
        r = results["vllm"]
        print(f"vllm  {args.tokens / r['seconds']:9.0f} tok/s   device memory in use {r['in_use_gib']:.1f} GiB (runner {r['runner']})")
    if len(results) == 2:
        hf, vl = np.load(folder / "hf.npz"), np.load(folder / "vllm.npz")
        for key in ("logprob", "entropy"):
            gap = np.nanmax(np.abs(hf[key] - vl[key]))
            print(f"max |hf - vllm| {key}: {gap:.2e} nats (mean |Δ| {np.nanmean(np.abs(hf[key] - vl[key])):.2e})")
        print(f"throughput ratio vllm / hf: {results['hf']['seconds'] / results['vllm']['seconds']:.2f}")


if __name__ == "__main__":
    main()
