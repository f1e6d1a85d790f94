"""`tokenprio eval`: stated answers, batched greedy decoding, perplexity of the scorer's targets vs float64, errors.

Run: .venv/bin/pytest -q tests/test_eval.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer
from typer.testing import CliRunner

import pipelines.evaluate as evaluate_module
from pipelines.cli import app
from pipelines.evaluate import DEFAULT_ANSWER_PATTERN, EvalConfig, end_of_turn_ids, evaluate, generate_batch, same_answer, stated_answer

RECORDS = [
    {"id": "chat", "messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, Answer: 42"}], "answer": 42},
    {"id": "completion", "prompt": "def add(a, b):\n", "completion": "    return a + b\n#### 1,234", "answer": "1234"},
    {"id": "text", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "long", "text": "To be, or not to be, that is the question. " * 12},  # longer than the model's context: windowed
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=3)
    model.config.max_position_embeddings = 64
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture()
def records(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Sure.\n1+2+0=3\nAnswer: 3", "3"),
        ("Answer: 1\nAnswer: 42", "42"),  # the last statement counts
        ("so #### 1,234", "1234"),
        ("Answer: -7.5 units", "-7.5"),
        ("Answer: ", None),
        ("no answer here 42", None),
    ],
)
def test_stated_answer(text, expected):
    assert stated_answer(text, DEFAULT_ANSWER_PATTERN) == expected


def test_same_answer_compares_numbers_and_strings():
    assert same_answer("42", 42) and same_answer("1234", "1,234") and same_answer("2.50", 2.5)
    assert not same_answer("41", 42) and not same_answer(None, 42)
    assert same_answer("yes", " yes ") and not same_answer("yes", "no")


def test_end_of_turn_ids(checkpoint):
    _, _, tokenizer = checkpoint
    assert end_of_turn_ids(tokenizer) == sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])


def test_batched_greedy_equals_one_by_one(checkpoint):
    """Left padding must not change a greedy continuation: the batch equals each prompt decoded alone."""
    _, model, tokenizer = checkpoint
    prompts = [tokenizer(text).input_ids for text in ("The quick brown", "To be, or not to be, that", "def")]
    stop = end_of_turn_ids(tokenizer)
    batched = generate_batch(model, prompts, 12, stop, tokenizer.pad_token_id)
    assert batched == [generate_batch(model, [p], 12, stop, tokenizer.pad_token_id)[0] for p in prompts]


def float64_target_nll(model, tokenizer) -> tuple[float, int]:
    """Σ −log p over each record's targets, by hand: chat reply + <|im_end|>, completion + EOS, text + EOS.

    The long record is longer than the 64-token context: its targets are scored in windows of 64 tokens
    whose first 16 tokens repeat the previous window, as the scorer windows them.
    """
    total, count = 0.0, 0

    def add(ids: list[int], first_target: int, last_exclusive: int) -> None:
        nonlocal total, count
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double()[0], -1)
        for t in range(first_target, last_exclusive):
            total -= logp[t - 1, ids[t]].item()
            count += 1

    chat = RECORDS[0]["messages"]
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    t_ids = tokenizer(chat[1]["content"] + "<|im_end|>", add_special_tokens=False).input_ids
    add(p_ids + t_ids, len(p_ids), len(p_ids) + len(t_ids))
    p_ids = tokenizer(RECORDS[1]["prompt"]).input_ids
    c_ids = tokenizer(RECORDS[1]["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    add(p_ids + c_ids, len(p_ids), len(p_ids) + len(c_ids))
    for record in RECORDS[2:]:
        ids = tokenizer(record["text"]).input_ids + [tokenizer.eos_token_id]
        start, end = 0, min(64, len(ids))
        add(ids[:end], 1, end)
        while end < len(ids):
            start = end - 16
            window = ids[start : start + 64]
            add(window, 16, len(window))
            end = start + len(window)
    return total, count


def test_perplexity_and_exact_match_against_a_float64_reference(checkpoint, records, monkeypatch, tmp_path):
    path, model, tokenizer = checkpoint
    canned = iter([[(tokenizer("Answer: 42", add_special_tokens=False).input_ids, True),
                    (tokenizer("#### 12", add_special_tokens=False).input_ids, False)]])
    monkeypatch.setattr(evaluate_module, "generate_batch", lambda model, prompts, n, stop, pad: next(canned)[: len(prompts)])
    metrics = evaluate(EvalConfig(checkpoint=path, records=records, out_dir=tmp_path))
    nll, n = float64_target_nll(model, tokenizer)
    assert metrics["n_records"] == 4 and metrics["n_targets"] == n
    assert metrics["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert metrics["n_answers"] == 2 and metrics["exact_match"] == 0.5  # 42 right, 12 ≠ 1234
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == metrics
    written = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [(g["id"], g["stated"], g["correct"], g["ended"]) for g in written] == [("chat", "42", True, True), ("completion", "12", False, False)]


def test_bad_inputs_are_named_before_the_model_loads(checkpoint, records, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        evaluate(EvalConfig(checkpoint=path, records=tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="has no config.json"):
        evaluate(EvalConfig(checkpoint=tmp_path, records=records))
    with pytest.raises(ValueError, match="needs a group"):
        evaluate(EvalConfig(checkpoint=path, records=records, answer_pattern=r"Answer: \d+"))
    text_with_answer = tmp_path / "text.jsonl"
    text_with_answer.write_text(json.dumps({"text": "2+2=4", "answer": 4}) + "\n")
    with pytest.raises(ValueError, match="text.jsonl, line 1: a text record has no prompt"):
        evaluate(EvalConfig(checkpoint=path, records=text_with_answer))


def test_cli_passes_the_config(monkeypatch, tmp_path):
    received = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda cfg: received.append(cfg) or {"exact_match": 1.0})
    result = CliRunner().invoke(app, ["eval", "ckpt", "--records", "p.jsonl", "--limit", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert received == [EvalConfig(checkpoint=Path("ckpt"), records=Path("p.jsonl"), limit=5, out_dir=tmp_path)]
    assert '"exact_match": 1.0' in result.output


def test_cli_error_is_one_line_and_exit_code_1(tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--records", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 1
    assert "has no config.json" in result.output
