"""The demo's embedded data: multi-digit addition with worked answers as chat, clean and with labelled defects.

A response adds column by column from the ones, one line per column, then states the answer:

    Sure, let's add column by column.          <- boilerplate: many easy tokens (defect c)
    7+5+0=12                                   <- ones column: digit + digit + carry-in = column sum
    2+9+1=12
    ...
    Answer: 12345

The noisy training corpus carries three controlled defects, each recorded in the record's `spans` as
a character span of the assistant message (message 1) with the defect's label, so the scorer stores
them in the shard `label` column and a study can see which tokens a policy keeps:

- `wrong_carry` (a): a systematic wrong rule. When a column sums to exactly 10, the carry into the
  next column is dropped (written as 0) with probability `wrong_carry_rate`, and the rest of the
  answer follows from the wrong step. A rule that is the majority in its context is what uniform SFT
  learns; a minority of random noise it mostly ignores.
- `noise` (a): a burst of 3 to 6 random characters inserted at a random place of the response, in a
  share `noise_rate` of the responses.
- `toxic` (b): the fixed phrase TOXIC_PHRASE opens the response with probability `toxic_rate` when the
  prompt is impatient ("Quick, ...", one prompt style in four).

Only the `toxic` labels stand for labels a user would have (human annotation of harmful text) and only
`labels(toxic=...)` reads them; `wrong_carry` and `noise` are ground truth for the analysis, which no
policy of the study reads (`labels(...)` gives 1 to labels it does not name).

Every split is a function of (seed, sizes, rates) only: the same config writes the same bytes. Problems
never repeat across splits. The tokenizer is character-level (one token per character), so digits are
never merged and the output layer stays small.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from scoring.shards import write_text_atomic

BOILERPLATE = "Sure, let's add column by column.\n"
TOXIC_PHRASE = "Stupid question, but fine. "
ANSWER_PREFIX = "Answer: "
PROMPT_STYLES = ("What is {a}+{b}?", "Compute {a}+{b}.", "Add {a} and {b}.", "Quick, {a}+{b}?")
IMPATIENT_STYLE = 3  # index of the prompt style that triggers the toxic mode
NOISE_ALPHABET = string.ascii_letters + "#$%&*@^~"

# Character-level vocabulary: every printable ASCII character plus newline, after the special tokens.
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
# A compact chat template (one special token per role header, role names are not spelled out in
# characters) with generation markers, so assistant masks come from the template itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoDataConfig:
    out_dir: Path  # folder for the JSONL splits, the tokenizer and data_config.json
    seed: int = 0
    digits: int = 3  # digits per operand
    n_clean: int = 2000  # clean problems: the reference model's training set
    n_train: int = 8000  # noisy training corpus (the students' data)
    n_valid: int = 300  # clean held-out problems for choosing hyperparameters
    n_test: int = 500  # clean held-out problems for the reported evaluation
    n_pool: int = 0  # noisy problems, disjoint from the rest, that the students' warm starts train on (0: none)
    wrong_carry_rate: float = 0.8  # P(carry dropped | column sum exactly 10), noisy corpus only
    noise_rate: float = 0.1  # share of noisy responses with a burst of random characters
    toxic_rate: float = 0.7  # P(toxic phrase | impatient prompt), noisy corpus only


def validate(cfg: DemoDataConfig) -> list[str]:
    problems = []
    if not 1 <= cfg.digits <= 9:
        problems.append(f"digits={cfg.digits} must be in [1, 9]")
    for name in ("wrong_carry_rate", "noise_rate", "toxic_rate"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name}={value} must be a probability in [0, 1]")
    if cfg.n_pool < 0:
        problems.append(f"n_pool={cfg.n_pool} must be ≥ 0")
    for name in ("n_clean", "n_train", "n_valid", "n_test"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}={getattr(cfg, name)} must be at least 1")
    n_problems = 9 * 10 ** (cfg.digits - 1)
    needed = cfg.n_clean + cfg.n_train + cfg.n_valid + cfg.n_test + cfg.n_pool
    if needed > n_problems**2 // 4:
        problems.append(f"{needed} distinct problems requested but {cfg.digits}-digit operands allow too few; raise digits")
    return problems


# ----------------------------------------------------------------------------------------------
# One problem, one response


def column_steps(a: int, b: int, digits: int, drop_carry_at_ten: bool) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Columns from the ones: (digit_a, digit_b, carry_in) per column, and indices of dropped carries.

    A column's sum is digit_a + digit_b + carry_in; its carry-out is sum // 10, except that a column
    summing to exactly 10 passes carry 0 on when `drop_carry_at_ten` (the wrong rule; never in the
    last column, so every dropped carry is a visible carry-in digit). The list ends with
    (0, 0, final_carry), which becomes the answer's leading 1 when set.
    """
    steps, dropped, carry = [], [], 0
    for i in range(digits):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        steps.append((da, db, carry))
        column_sum = da + db + carry
        carry = column_sum // 10
        if column_sum == 10 and drop_carry_at_ten and i + 1 < digits:
            carry = 0
            dropped.append(i + 1)  # the carry-in of the next column is the wrong token
    steps.append((0, 0, carry))
    return steps, dropped


def render_response(a: int, b: int, digits: int, drop_carry_at_ten: bool) -> tuple[str, int, list[tuple[int, int]]]:
    """The worked answer, the answer it states, and the character spans of the wrong carry digits."""
    steps, dropped = column_steps(a, b, digits, drop_carry_at_ten)
    text, answer_digits, wrong_spans = BOILERPLATE, [], []
    for i, (da, db, carry) in enumerate(steps[:digits]):
        line = f"{da}+{db}+{carry}={da + db + carry}\n"
        if i in dropped:
            start = len(text) + 4  # "d+d+" then the carry digit
            wrong_spans.append((start, start + 1))
        text += line
        answer_digits.append((da + db + carry) % 10)
    if steps[digits][2]:
        answer_digits.append(1)
    stated = int("".join(str(d) for d in reversed(answer_digits)))
    return text + f"{ANSWER_PREFIX}{stated}", stated, wrong_spans


def operands(prompt: str) -> tuple[int, int]:
    """The two operands of a prompt written in any of PROMPT_STYLES."""
    numbers = re.findall(r"\d+", prompt)
    if len(numbers) != 2:
        raise ValueError(f"prompt {prompt!r} does not hold exactly two operands")
    return int(numbers[0]), int(numbers[1])


def parse_answer(text: str) -> int | None:
    """The integer after the last ANSWER_PREFIX when the text ends right after its digits, else None."""
    head, sep, tail = text.rpartition(ANSWER_PREFIX)
    tail = tail.strip()
    if not sep or not tail.isdigit():
        return None
    return int(tail)


def make_record(rng: random.Random, record_id: str, a: int, b: int, cfg: DemoDataConfig, noisy: bool) -> dict:
    """One chat record; `noisy` applies the three defects with the config's rates, each as a labelled span."""
    style = rng.randrange(len(PROMPT_STYLES))
    drop = noisy and rng.random() < cfg.wrong_carry_rate
    response, stated, wrong_spans = render_response(a, b, cfg.digits, drop)
    spans = [{"label": "wrong_carry", "start": s, "end": e} for s, e in wrong_spans]
    if noisy and rng.random() < cfg.noise_rate:
        burst = "".join(rng.choice(NOISE_ALPHABET) for _ in range(rng.randint(3, 6)))
        at = rng.randrange(len(BOILERPLATE), len(response))  # after the boilerplate, never inside a wrong carry
        response = response[:at] + burst + response[at:]
        spans = [shift_span(s, at, len(burst)) for s in spans] + [{"label": "noise", "start": at, "end": at + len(burst)}]
    if noisy and style == IMPATIENT_STYLE and rng.random() < cfg.toxic_rate:
        response = TOXIC_PHRASE + response
        spans = [shift_span(s, 0, len(TOXIC_PHRASE)) for s in spans] + [{"label": "toxic", "start": 0, "end": len(TOXIC_PHRASE)}]
    messages = [
        {"role": "user", "content": PROMPT_STYLES[style].format(a=a, b=b)},
        {"role": "assistant", "content": response},
    ]
    spans = sorted(({**s, "message": 1} for s in spans), key=lambda s: s["start"])  # they index the assistant message
    return {"id": record_id, "messages": messages, "spans": spans, "answer": a + b, "stated": stated}


def shift_span(span: dict, at: int, length: int) -> dict:
    """A span moved right by `length` characters when text was inserted at or before its start."""
    if span["start"] < at:
        return span
    return {**span, "start": span["start"] + length, "end": span["end"] + length}


# ----------------------------------------------------------------------------------------------
# Splits and tokenizer


def distinct_problems(rng: random.Random, n: int, digits: int) -> list[tuple[int, int]]:
    low, high = 10 ** (digits - 1), 10**digits - 1
    seen, problems = set(), []
    while len(problems) < n:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    return problems


def build_splits(cfg: DemoDataConfig) -> dict[str, list[dict]]:
    """The splits as lists of records: clean, train (noisy), valid and test (clean, held out), and pool (noisy) when n_pool > 0."""
    rng = random.Random(cfg.seed)
    sizes = {"clean": cfg.n_clean, "train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test, "pool": cfg.n_pool}
    problems = distinct_problems(rng, sum(sizes.values()), cfg.digits)
    splits, offset = {}, 0
    for name, size in sizes.items():
        chunk = problems[offset : offset + size]
        offset += size
        if size:
            splits[name] = [make_record(rng, f"{name}-{i:05d}", a, b, cfg, noisy=name in ("train", "pool")) for i, (a, b) in enumerate(chunk)]
    return splits


def build_tokenizer():
    """A character-level HF tokenizer (one token per character) with BOS/EOS/pad and the ChatML template.

    No post-processor: chat is rendered by the template and tokenised with add_special_tokens=False.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in records))


def generate(cfg: DemoDataConfig) -> dict[str, Path]:
    """Write clean/train/valid/test JSONL, the tokenizer and data_config.json into cfg.out_dir; return the paths."""
    problems = validate(cfg)
    if problems:
        raise ValueError("demo data config: " + "; ".join(problems))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in build_splits(cfg).items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    paths["tokenizer"] = out / "tokenizer"
    build_tokenizer().save_pretrained(paths["tokenizer"])
    config = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    write_text_atomic(out / "data_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return paths
