"""Ray engine scaling: `tokenprio score --engine ray` with 2 single-thread workers vs 1, HF backend.

    python bench/bench_ray.py [--docs 256] [--records-per-shard 16] [--rounds 2]

Model: the hidden-256, 4-layer Llama with the GPT-2 vocabulary (50,257; data/gpt2-tokenizer/) that
bench/bench_vllm.py --gpt2-vocab uses, random weights; data: the first --docs GSM8K training records of
data/gsm8k/train.jsonl as prompt (question) / completion (answer) records. One local Ray cluster
(ray.init(num_cpus=2)) serves every run, so cluster start-up is not timed, as on a running cluster; each
run scores the whole corpus into a fresh folder, actor start-up and model loading included.

Methods, alternating order each round:
  local    --engine local with one torch thread (no Ray)
  ray1     --engine ray --workers 1 --worker-cpus 1
  ray2     --engine ray --workers 2 --worker-cpus 1
Prints tokens/s (best of the rounds) and ray2 / ray1 (target >= 1.6), checks that all three wrote the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm import data_path, save_model  # noqa: E402  (the same model as the vLLM benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=256, help="GSM8K records (the repository ships 2,000)")
    parser.add_argument("--records-per-shard", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    from pipelines.engines import EngineConfig
    from pipelines.score import ScoreConfig, score
    from scoring.backends import ScorerConfig
    from scoring.inputs import FieldNames

    # ---- model, corpus, cluster
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    save_model(work / "model", gpt2_vocab=True)
    lines = data_path("gsm8k", "train.jsonl").read_text().splitlines()[: args.docs]
    (work / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    engines = {
        "local": EngineConfig(),
        "ray1": EngineConfig(engine="ray", workers=1, worker_cpus=1),
        "ray2": EngineConfig(engine="ray", workers=2, worker_cpus=1),
    }
    load_before = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False)
    torch.set_num_threads(1)  # the local engine's one thread, as each actor has

    def run(name: str, round_index: int) -> tuple[float, int]:
        out = work / f"{name}-{round_index}"
        cfg = ScoreConfig(inputs=(str(work / "corpus.jsonl"),), out=str(out), scorer=ScorerConfig(model=str(work / "model"), batch_tokens=8192),
                          fields=FieldNames(prompt="question", completion="answer"), max_length=1024, n_context=128,
                          records_per_shard=args.records_per_shard, engine=engines[name])
        start = time.perf_counter()
        manifest = score(cfg)
        return time.perf_counter() - start, manifest["totals"]["tokens"]

    # ---- rounds, alternating the order
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens = 0
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
        for name in order:
            elapsed, tokens = run(name, round_index)
            seconds[name].append(elapsed)
        print(f"round {round_index}: " + "  ".join(f"{name} {tokens / seconds[name][-1]:7.0f} tok/s" for name in engines), flush=True)
    ray.shutdown()

    # ---- same output everywhere, then the summary
    reference = {p.name: p.read_bytes() for p in (work / "local-0").glob("part-*.parquet")}
    same = all({p.name: p.read_bytes() for p in (work / f"{name}-{r}").glob("part-*.parquet")} == reference
               for name in engines for r in range(args.rounds))
    best = {name: tokens / min(values) for name, values in seconds.items()}
    n_shards = len(json.loads((work / "local-0" / "_manifest.json").read_text())["shards"])
    print(f"\n{args.docs} GSM8K records, {tokens} tokens, {n_shards} shards; best of {args.rounds}; identical shards in every run: {same}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (2 workers need 2 idle cores)")
    for name in engines:
        print(f"{name:6s} {best[name]:7.0f} tok/s   ({min(seconds[name]):.1f} s)")
    print(f"ratio ray2 / ray1:  {best['ray2'] / best['ray1']:.2f}  (target >= 1.6)")
    print(f"ratio ray1 / local: {best['ray1'] / best['local']:.2f}  (Ray's overhead: actor start-up, model load in the actor)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
