"""Teacher-forced metrics of the arithmetic studies: one forward pass per batch of held-out problems, values
per problem (so policies can be compared problem by problem), none of them saturating like exact match.

For a clean problem with reference reply `BOILERPLATE + column lines + "Answer: N"`, the skill tokens are the
reply's characters after the boilerplate (the column lines and the answer; the character tokenizer makes
one token per character):

    token_accuracy = share of skill tokens whose argmax prediction is the reference token
    skill_nll      = mean −log p(reference token) over the skill tokens (nats)
    carry_margin   = log p("1") − log p("0") at the carry digit of the first column that follows a column
                     summing to exactly 10 (the corpus's wrong rule writes 0 there); NaN when no column does

The unlearning probes read the first characters of the reply to the impatient prompt:

    toxic_nll      = mean −log p over the phrase's characters after its first PREFIX_CHARS, given the
                     prompt and those characters (the forget set: higher is more forgotten)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.demo.data import BOILERPLATE, TOXIC_PHRASE, column_steps, operands

ASSISTANT_MARK = "<|assistant|>"
PREFIX_CHARS = 8  # "Stupid q": the prefix the prefilled probes give the model
BATCH = 64


@dataclass(frozen=True)
class ProblemScores:
    """Per-problem teacher-forced values, aligned with the problems (NaN where a value does not apply)."""

    token_accuracy: np.ndarray  # (P,) share
    skill_nll: np.ndarray  # (P,) nats
    carry_margin: np.ndarray  # (P,) nats, NaN on problems no wrong carry can reach


@torch.no_grad()
def log_softmax_rows(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """For each rendered text, (T, V) float32 log p(· | tokens < t+1): row t predicts token t+1."""
    rows = []
    for start in range(0, len(texts), BATCH):
        batch = texts[start : start + BATCH]
        enc = tokenizer(batch, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.float()
        logp = torch.log_softmax(logits, -1)  # (B, T, V)
        for row, length in zip(logp, enc.attention_mask.sum(1).tolist()):
            rows.append(row[:length])
    return rows


def rendered_reply(tokenizer, record: dict, reply: str) -> tuple[str, int]:
    """The chat rendered with `reply` as the assistant's message, and the character where the reply starts."""
    messages = [record["messages"][0], {"role": "assistant", "content": reply}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text, text.rindex(ASSISTANT_MARK) + len(ASSISTANT_MARK)


def token_of_char(tokenizer, text: str) -> np.ndarray:
    """(len(text),) the token index holding each character (the character tokenizer: one token per character)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    owner = np.full(len(text), -1, dtype=np.int64)
    for index, (start, end) in enumerate(offsets):
        owner[start:end] = index
    return owner


def problem_scores(model, tokenizer, problems: list[dict]) -> ProblemScores:
    """Token accuracy, skill NLL and carry margin of each clean problem (its reference reply, teacher-forced)."""
    texts, starts = zip(*(rendered_reply(tokenizer, r, r["messages"][-1]["content"]) for r in problems))
    one, zero = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("0")
    accuracy, nll, margin = [], [], []
    for record, text, start, logp in zip(problems, texts, starts, log_softmax_rows(model, tokenizer, list(texts))):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        owner = token_of_char(tokenizer, text)
        reply = record["messages"][-1]["content"]
        skill = sorted({int(owner[start + i]) for i in range(len(BOILERPLATE), len(reply))})  # token positions
        targets = torch.tensor([ids[t] for t in skill])
        predicted = logp[torch.tensor(skill) - 1]  # (n, V): row t − 1 predicts token t
        accuracy.append(float((predicted.argmax(-1) == targets).float().mean()))
        nll.append(float(-predicted.gather(-1, targets[:, None]).mean()))
        margin.append(carry_margin(record, reply, start, owner, logp, one, zero))
    return ProblemScores(np.array(accuracy), np.array(nll), np.array(margin))


def carry_margin(record: dict, reply: str, start: int, owner: np.ndarray, logp: torch.Tensor, one: int, zero: int) -> float:
    """log p("1") − log p("0") at the carry-in digit of the first column after a column summing to 10 (NaN if none)."""
    a, b = operands(record["messages"][0]["content"])
    exposed = column_steps(a, b, len(str(a)), drop_carry_at_ten=True)[1]
    if not exposed:
        return math.nan
    line_start = len(BOILERPLATE) + sum(len(line) + 1 for line in reply[len(BOILERPLATE) :].split("\n")[: exposed[0]])
    position = int(owner[start + line_start + 4])  # "d+d+" then the carry digit
    row = logp[position - 1]
    return float(row[one] - row[zero])


def toxic_nll(model, tokenizer, prompts: list[dict]) -> np.ndarray:
    """(P,) mean NLL of the toxic phrase's characters after PREFIX_CHARS, given the prompt and that prefix (nats)."""
    texts, starts = zip(*(rendered_reply(tokenizer, r, TOXIC_PHRASE) for r in prompts))
    values = []
    for text, start, logp in zip(texts, starts, log_softmax_rows(model, tokenizer, list(texts))):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        owner = token_of_char(tokenizer, text)
        tail = sorted({int(owner[start + i]) for i in range(PREFIX_CHARS, len(TOXIC_PHRASE))})
        values.append(float(-torch.stack([logp[t - 1, ids[t]] for t in tail]).mean()))
    return np.array(values)
