"""Evaluate a chat checkpoint on held-out problems: accuracy, the toxic phrase, well-formedness, perplexity.

A problems file is JSONL; each record has `messages` whose last message is the reference assistant
answer, and an integer `answer`. The model sees every message but the last (with the template's
generation prompt) and decodes greedily, in batches, until the end-of-turn token:

    accuracy    = share of problems whose generation states `Answer: N` (the last one, at the end) with N = answer
    toxic_rate  = share of generations that contain `toxic_phrase` verbatim
    well_formed = share of generations that end their turn and end with a parseable `Answer: N`
                  (what aggressive hard selection breaks first: the fragmentation signature)
    ppl_clean   = exp(Σ_t ℓ_t / n) over the reference answers' target tokens (assistant content and the
                  end-of-turn token, from the template's generation markers), ℓ_t = −log p(x_t | x_<t)

Perplexity on unrelated text is not measured: the demo's models are trained on arithmetic only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines.demo_data import TOXIC_PHRASE, parse_answer
from scoring.shards import write_text_atomic
from scoring.stats import final_hidden, token_stats


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path  # HF model folder with its tokenizer (chat template included)
    problems: Path  # JSONL: `messages` (last = reference answer) and integer `answer`
    batch_size: int = 64  # problems per generate / perplexity batch
    max_new_tokens: int = 160  # generation budget per problem, in tokens
    toxic_phrase: str = TOXIC_PHRASE  # counted verbatim in the generations
    limit: int = 0  # evaluate only the first N problems (0: all)
    out_dir: Path | None = None  # where to write eval.json and generations.jsonl (None: nowhere)


class ProblemsFileError(ValueError):
    """A problems file that cannot be evaluated; the message names the file, line and fix."""


def read_problems(path: Path, limit: int) -> list[dict]:
    """Records of a problems file, checked up front: messages end with the assistant answer, `answer` is an int."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"problems file {path} does not exist; generate it with `tokenprio demo` (data/test.jsonl)")
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record.get("messages")
            if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
                raise ProblemsFileError(f"{path} line {line_no}: `messages` must hold a prompt and end with the reference assistant answer")
            if not isinstance(record.get("answer"), int):
                raise ProblemsFileError(f"{path} line {line_no}: `answer` must be an integer (got {record.get('answer')!r})")
            records.append(record)
            if limit and len(records) == limit:
                break
    if not records:
        raise ProblemsFileError(f"{path} holds no problems")
    return records


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS and the token the chat template puts right after assistant content (e.g. <|end|>)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False)
    after = rendered[rendered.rindex("y") + 1 :]
    ids = {tokenizer.eos_token_id}
    following = tokenizer(after, add_special_tokens=False).input_ids
    if following and following[0] in tokenizer.all_special_ids:
        ids.add(following[0])
    return sorted(ids)


# ----------------------------------------------------------------------------------------------
# Generation and scoring of generations


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, stop_ids: list[int]) -> list[tuple[str, bool]]:
    """Greedy completions of rendered prompts (left-padded batch): (text without specials, ended its turn)."""
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    output = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    new_tokens = output[:, enc.input_ids.shape[1] :]  # (B, ≤ max_new_tokens)
    results = []
    for row in new_tokens.tolist():
        stop_at = next((i for i, t in enumerate(row) if t in stop_ids), None)
        ended = stop_at is not None
        results.append((tokenizer.decode(row[:stop_at] if ended else row, skip_special_tokens=True), ended))
    return results


def score_generation(text: str, ended: bool, answer: int, toxic_phrase: str) -> dict:
    """Per-problem outcome of one generation: correct, toxic, well_formed (booleans)."""
    stated = parse_answer(text)
    return {"correct": stated == answer, "toxic": toxic_phrase in text, "well_formed": ended and stated is not None}


# ----------------------------------------------------------------------------------------------
# Perplexity on reference answers


@torch.no_grad()
def response_nll(model, tokenizer, conversations: list[list[dict]]) -> tuple[float, int]:
    """Σ ℓ_t (nats) and the number of target tokens over the conversations' assistant tokens.

    Targets are the template's generation-marked tokens (assistant content and end-of-turn); rendered
    chat is tokenised without added special tokens, as the scorer does. Right padding never reaches
    a target: position t only attends to tokens [0, t].
    """
    enc = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, padding=True, padding_side="right", return_tensors="pt"
    )
    ids, attention = enc["input_ids"], enc["attention_mask"]  # (B, T)
    targets_mask = enc["assistant_masks"].bool() & attention.bool()
    targets_mask[:, 0] = False  # position 0 has no prediction
    hidden = final_hidden(model, ids, attention)[:, :-1]  # (B, T-1, D); row t predicts token t+1
    select = targets_mask[:, 1:]  # (B, T-1)
    logprob, _ = token_stats(model, hidden[select], ids[:, 1:][select], chunk_rows=4096, with_entropy=False)
    return float(-logprob.double().sum()), int(select.sum())


# ----------------------------------------------------------------------------------------------
# Entry point


def evaluate(cfg: EvalConfig) -> dict:
    """Metrics of one checkpoint on a problems file (see the module docstring); writes them when out_dir is set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # ---- validate and load
    if not (Path(cfg.checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint} has no config.json; pass a HF model folder (e.g. runs/demo/students/uniform)")
    records = read_problems(cfg.problems, cfg.limit)
    tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer in {cfg.checkpoint} has no chat template; save the tokenizer used in training next to the model")
    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=torch.float32).eval()
    stop_ids = end_of_turn_ids(tokenizer)

    # ---- generate and score, in batches
    outcomes, nll_sum, n_targets = [], 0.0, 0
    for start in tqdm(range(0, len(records), cfg.batch_size), desc=f"eval {Path(cfg.checkpoint).name}", leave=False):
        batch = records[start : start + cfg.batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in batch]
        for record, (text, ended) in zip(batch, generate_batch(model, tokenizer, prompts, cfg.max_new_tokens, stop_ids)):
            outcomes.append({"id": record.get("id"), "generation": text, "ended": ended, **score_generation(text, ended, record["answer"], cfg.toxic_phrase)})
        batch_nll, batch_targets = response_nll(model, tokenizer, [r["messages"] for r in batch])
        nll_sum, n_targets = nll_sum + batch_nll, n_targets + batch_targets

    # ---- aggregate and write
    n = len(outcomes)
    metrics = {
        "n_problems": n,
        "accuracy": sum(o["correct"] for o in outcomes) / n,
        "toxic_rate": sum(o["toxic"] for o in outcomes) / n,
        "well_formed": sum(o["well_formed"] for o in outcomes) / n,
        "ppl_clean": math.exp(nll_sum / n_targets),
    }
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # eval.json last: its presence marks a finished evaluation (the demo reuses it).
        write_text_atomic(out / "generations.jsonl", "".join(json.dumps(o) + "\n" for o in outcomes))
        write_text_atomic(out / "eval.json", json.dumps({"config": {k: str(v) for k, v in asdict(cfg).items()}, "metrics": metrics}, indent=2) + "\n")
    return metrics
