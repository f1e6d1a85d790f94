"""`tokenprio project` throughput on one core, against plain re-tokenisation of the same texts in the same run.

    .venv/bin/python bench/bench_project.py [--docs 2000] [--copies 1] [--rounds 3] [--student bpe|char|gpt2] [--cpu 0]

Data: the first --docs GSM8K training records of data/gsm8k/train.jsonl as prompt (question) / completion
(answer) records (`--copies K`: the list K times, so fixed costs such as loading the
student tokenizer weigh less), written as GPT-2 shards (data/gpt2-tokenizer, truncation off) by `tokenprio score
--tokenizer` with 500 records per shard, then given random reference statistics (the benchmark measures
the projection, not a model). Student tokenizers, built in this process: `bpe` a byte-level BPE of 4,000
tokens trained on the same records with digits split one by one; `char` one token per character; `gpt2`
the reference's own (the identity).

Timed, alternating round by round, in this one process pinned to one CPU core (one tokenizer / BLAS thread):
- project: the whole `tokenprio project` job (load and fingerprint the student tokenizer, read the shards, re-encode every record with the student,
  check its tokens reproduce the text, project every column, re-window at 512 tokens, write the shards);
- baseline: the student tokenizer alone on the same prompt/completion texts, batched, with offsets, i.e. the
  re-tokenisation any projection must do.
Prints student tokens/s of each (best round) and their ratio.
"""

from __future__ import annotations

import os

os.environ.update(OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data"


def data_path(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} is missing: the benchmarks read the data shipped in the repository's data/ folder "
                         f"(see data/README.md); restore it with `git checkout -- data`.")
    return path


def student_tokenizer(kind: str, texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "gpt2":
        return AutoTokenizer.from_pretrained(data_path("gpt2-tokenizer"))
    if kind == "char":
        specials = ["<s>", "</s>", "<pad>", "<unk>"]
        chars = sorted({c for text in texts for c in text})
        core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        core.decoder = decoders.Fuse()
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>")


def reference_shards(work: Path, records: list[dict]) -> Path:
    """GPT-2 shards of the records with random reference statistics, through the shard contract's own writers."""
    import numpy as np

    from pipelines.score import ScoreConfig, score
    from scoring.shards import open_shards, read_metadata, read_table, shard_index, with_metadata, with_statistics, write_manifest, write_shard_file

    (work / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    score(ScoreConfig(inputs=(str(work / "gsm8k.jsonl"),), out=str(work / "unscored"), tokenizer=str(data_path("gpt2-tokenizer")),
                      max_length=512, n_context=64, records_per_shard=500))
    unscored, rng, entries = open_shards(work / "unscored"), np.random.default_rng(0), []
    for path in unscored.paths:
        table = read_table(path)
        stats = []
        for n in table.column("n_tokens").to_numpy():
            logprob, entropy = -rng.uniform(0.01, 8.0, n).astype(np.float32), rng.uniform(0.01, 5.0, n).astype(np.float32)
            logprob[0] = entropy[0] = np.nan
            stats.append((logprob, entropy))
        table = with_statistics(table, "ref", stats)
        entries.append(write_shard_file(with_metadata(table, read_metadata(path)), work / "ref", shard_index(path)))
    write_manifest(work / "ref", entries, unscored.metadata)
    return work / "ref"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=2000, help="GSM8K records (at most the 2,000 shipped)")
    parser.add_argument("--copies", type=int, default=1, help="the records this many times (ids stay distinct)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student", choices=["bpe", "char", "gpt2"], default="bpe")
    parser.add_argument("--cpu", type=int, default=None, help="CPU core to pin to (default: the first allowed)")
    args = parser.parse_args()
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})

    from pipelines.project import ProjectConfig, project_shards
    from scoring.shards import open_shards

    lines = data_path("gsm8k", "train.jsonl").read_text().splitlines()[: args.docs]
    if args.docs > len(lines):
        print(f"--docs {args.docs}: the repository ships {len(lines)} GSM8K training records; using those.")
    rows = [json.loads(line) for line in lines]
    records = [{"prompt": r["question"] + "\n", "completion": r["answer"]} for r in rows] * args.copies
    work = Path(tempfile.mkdtemp(prefix="bench_project_"))
    try:
        reference = reference_shards(work, records)
        tokenizer = student_tokenizer(args.student, [r["prompt"] + r["completion"] for r in records])
        tokenizer.save_pretrained(work / "student")
        from transformers import AutoTokenizer

        student = AutoTokenizer.from_pretrained(work / "student")
        student.backend_tokenizer.no_truncation()
        prompts, completions = [r["prompt"] for r in records], [r["completion"] for r in records]

        def baseline() -> int:
            a = student(prompts, return_offsets_mapping=True, truncation=False)
            b = student(completions, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
            return sum(map(len, a["input_ids"])) + sum(map(len, b["input_ids"])) + len(records)  # + the appended EOS

        def project(round_index: int) -> int:
            out = work / f"projected-{round_index}"
            manifest = project_shards(ProjectConfig(shards=str(reference), tokenizer=str(work / "student"), out=str(out), max_length=512, n_context=64))
            shutil.rmtree(out)
            return manifest["totals"]["tokens"]  # student tokens written (a repeated context counted again)

        source_tokens = open_shards(reference).manifest["totals"]["tokens"]
        results = {"baseline": [], "project": []}
        for round_index in range(args.rounds):
            for method in ("baseline", "project"):
                start = time.perf_counter()
                tokens = baseline() if method == "baseline" else project(round_index)
                results[method].append((tokens, time.perf_counter() - start))
        print(f"\n{len(records)} GSM8K records ({len(rows)} × {args.copies}), reference GPT-2 shards of {source_tokens:,} tokens, student {args.student}, CPU core {cpu}")
        best = {}
        for method, runs in results.items():
            tokens, seconds = min(runs, key=lambda r: r[1])
            best[method] = tokens / seconds
            print(f"{method:>9}: {tokens:,} student tokens in {seconds:.3f} s = {best[method]:,.0f} tokens/s (best of {len(runs)}; "
                  f"all: {', '.join(f'{t / s:,.0f}' for t, s in runs)})")
        print(f"ratio project / baseline: {best['project'] / best['baseline']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
