"""`tokenprio eval`: a checkpoint on held-out records: perplexity of the reference targets and, for records
with an `answer`, greedy exact match.

Records are read and encoded exactly as `tokenprio score` does (JSONL of chat, prompt/completion or text
records; scoring.inputs), so the targets are the scorer's: assistant content plus its end-of-turn token
for chat, the completion plus EOS, every text token plus EOS. Records longer than the model's context are
windowed as the scorer windows them; every target counts once.

    nll         = Σ_t ℓ_t / n over the targets, ℓ_t = −log p(x_t | x_<t) (nats)      ppl = exp(nll)
    exact_match = share of records with `answer` whose generation's stated answer equals it; the stated
                  answer is group 1 of the last match of `answer_pattern`, commas removed

A generation is greedy, from the record's prompt (a chat without its last assistant message, rendered with
the template's generation prompt; or the `prompt` of a prompt/completion record), until EOS, the chat
template's end-of-turn token, or `max_new_tokens`. Generations are written to generations.jsonl, the
metrics to eval.json (last: its presence marks a finished evaluation).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from scoring.inputs import FieldNames, InputError, encode_record, iter_records, split_windows
from scoring.shards import write_text_atomic

DEFAULT_ANSWER_PATTERN = r"(?:Answer:|####)\s*(-?[\d,]*\.?\d+)"
SCORING_BATCH_TOKENS = 8192  # padded tokens per perplexity forward pass


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path  # HF model folder with its tokenizer
    records: Path  # JSONL: chat, prompt/completion or text records; optional `answer`
    out_dir: Path | None = None  # eval.json and generations.jsonl (None: nowhere)
    batch_size: int = 64  # records per generation batch
    max_new_tokens: int = 256  # generation budget per record with an answer, in tokens
    answer_pattern: str = DEFAULT_ANSWER_PATTERN  # group 1 at the last match is the stated answer
    limit: int = 0  # evaluate only the first N records (0: all)


def validate(cfg: EvalConfig) -> list[str]:
    problems = []
    if not any((Path(cfg.checkpoint) / name).is_file() for name in ("config.json", "adapter_config.json")):  # a LoRA checkpoint: base + adapter
        problems.append(f"checkpoint {cfg.checkpoint} has no config.json; pass a HF model folder (e.g. RUN/checkpoint-000500).")
    if not Path(cfg.records).is_file():
        problems.append(f"--records {cfg.records}: no such file.")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or cfg.limit < 0:
        problems.append("--batch-size and --max-new-tokens must be positive, --limit ≥ 0.")
    try:
        if re.compile(cfg.answer_pattern).groups < 1:
            problems.append(f"--answer-pattern {cfg.answer_pattern!r}: needs a group ( ... ) around the answer.")
    except re.error as error:
        problems.append(f"--answer-pattern {cfg.answer_pattern!r}: not a regular expression ({error}).")
    return problems


def stated_answer(text: str, pattern: str) -> str | None:
    """Group 1 of the last match of `pattern` in `text`, commas removed; None when it does not match."""
    matches = list(re.finditer(pattern, text))
    return matches[-1].group(1).replace(",", "") if matches else None


def same_answer(stated: str | None, answer) -> bool:
    """Equal as numbers when both parse as numbers, else as stripped strings."""
    if stated is None:
        return False
    expected = str(answer).replace(",", "").strip()
    try:
        return float(stated) == float(expected)
    except ValueError:
        return stated.strip() == expected


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS, and the special token the chat template puts right after assistant content (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    if tokenizer.chat_template is not None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False)
        following = tokenizer(rendered[rendered.rindex("y") + 1 :], add_special_tokens=False).input_ids
        special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}  # the scorer's end-of-turn rule
        if following and following[0] in special_ids:
            ids.add(following[0])
    return sorted(ids)


def prompt_ids(record, tokenizer) -> list[int] | None:
    """Token ids the model continues for a record with an answer: the chat without its last reply, or the prompt."""
    if record.kind == "chat":
        messages = record.data[record.fields.messages]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise InputError(f"{record.source}, line {record.line}: a chat record with an `answer` must end with the assistant's reply.")
        text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    if record.kind == "completion":
        return tokenizer(record.data[record.fields.prompt], add_special_tokens=True).input_ids
    raise InputError(f"{record.source}, line {record.line}: a text record has no prompt to answer; give chat or prompt/completion records an `answer`.")


# ----------------------------------------------------------------------------------------------
# Generation and perplexity


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int) -> list[tuple[list[int], bool]]:
    """Greedy continuations of token-id prompts (left-padded batch): (new ids up to the stop token, ended)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id
    )
    results = []
    for row in output[:, width:].tolist():
        stop_at = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row[:stop_at] if stop_at is not None else row, stop_at is not None))
    return results


def target_nll(model, windows) -> tuple[float, int]:
    """Σ ℓ_t (nats, float64) over the windows' loss_mask positions, and their number (the scorer's own HF path)."""
    from scoring.hf_backend import score_windows_hf

    stats = score_windows_hf(model, [w.input_ids for w in windows], device=model.device, batch_tokens=SCORING_BATCH_TOKENS,
                             logits_budget_bytes=64 * 2**20)
    total, count = 0.0, 0
    for window, (logprob, _) in zip(windows, stats):
        mask = torch.tensor(window.loss_mask)
        total -= float(torch.from_numpy(logprob)[mask].double().sum())
        count += int(mask.sum())
    return total, count


# ----------------------------------------------------------------------------------------------
# Entry point


def evaluate(cfg: EvalConfig) -> dict:
    """Metrics of one checkpoint on a records file (see the module docstring); writes them when out_dir is set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # ---- validate, read and encode every record before loading the model
    problems = validate(cfg)
    if problems:
        raise ValueError("\n".join(problems))
    tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
    records = []
    for record in iter_records([str(cfg.records)], FieldNames()):
        records.append(record)
        if cfg.limit and len(records) == cfg.limit:
            break
    if not records:
        raise InputError(f"{cfg.records} holds no records.")
    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=torch.float32).eval()
    context = model.config.max_position_embeddings
    windows = []
    for record in records:
        encoded = encode_record(record, tokenizer)
        windows += split_windows(encoded, max_length=context, n_context=max(1, context // 4))[0]
    with_answer = [r for r in records if r.data.get("answer") is not None]
    prompts = [prompt_ids(r, tokenizer) for r in with_answer]
    stop_ids = end_of_turn_ids(tokenizer)

    # ---- perplexity of the reference targets
    nll_sum, n_targets = target_nll(model, windows)

    # ---- greedy generations for records with an answer, in batches
    outcomes = []
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=f"eval {Path(cfg.checkpoint).name}", leave=False):
        batch = prompts[start : start + cfg.batch_size]
        for record, (ids, ended) in zip(with_answer[start : start + cfg.batch_size], generate_batch(model, batch, cfg.max_new_tokens, stop_ids, tokenizer.pad_token_id or 0)):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            stated = stated_answer(text, cfg.answer_pattern)
            outcomes.append({"id": record.doc_id, "generation": text, "ended": ended, "stated": stated, "correct": same_answer(stated, record.data["answer"])})

    # ---- aggregate and write
    metrics = {
        "n_records": len(records),
        "n_targets": n_targets,
        "nll": nll_sum / n_targets if n_targets else None,
        "ppl": math.exp(nll_sum / n_targets) if n_targets else None,
        "n_answers": len(outcomes),
        "exact_match": sum(o["correct"] for o in outcomes) / len(outcomes) if outcomes else None,
    }
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "generations.jsonl", "".join(json.dumps(o) + "\n" for o in outcomes))
        write_text_atomic(out / "eval.json", json.dumps({"config": {k: str(v) for k, v in asdict(cfg).items()}, "metrics": metrics}, indent=2) + "\n")
    return metrics
