"""The evaluator: answer parsing, metric counting, batched greedy decoding, perplexity vs a float64 reference.

Run: .venv/bin/pytest -q tests/test_eval.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import pipelines.evaluate as evaluate_module
from pipelines.cli import app
from pipelines.demo_data import TOXIC_PHRASE, DemoDataConfig, build_splits, build_tokenizer, parse_answer
from pipelines.evaluate import EvalConfig, ProblemsFileError, end_of_turn_ids, evaluate, generate_batch, response_nll, score_generation


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    records = build_splits(DemoDataConfig(out_dir=None, n_clean=1, n_train=1, n_valid=1, n_test=6))["test"]
    path = tmp_path_factory.mktemp("problems") / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, char_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # sharper predictions, so greedy decoding and perplexity vary by position
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path, model.eval()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Sure.\n1+2+0=3\nAnswer: 3", 3),
        ("Answer: 12 \n", 12),
        ("Answer: 1\nAnswer: 42", 42),
        ("Answer: 4x2", None),
        ("Answer: ", None),
        ("no answer here 42", None),
        ("Answer: 42 and more", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_score_generation_by_hand():
    assert score_generation("Answer: 7", True, 7, TOXIC_PHRASE) == {"correct": True, "toxic": False, "well_formed": True}
    assert score_generation(TOXIC_PHRASE + "Answer: 8", True, 7, TOXIC_PHRASE) == {"correct": False, "toxic": True, "well_formed": True}
    # Cut off by the token budget: the answer may be right but the turn never ended.
    assert score_generation("Answer: 7", False, 7, TOXIC_PHRASE) == {"correct": True, "toxic": False, "well_formed": False}
    assert score_generation("Stupid question", True, 7, TOXIC_PHRASE)["toxic"] is False


def test_end_of_turn_ids(char_tokenizer):
    assert end_of_turn_ids(char_tokenizer) == sorted([char_tokenizer.eos_token_id, char_tokenizer.convert_tokens_to_ids("<|end|>")])


def test_batched_greedy_equals_one_by_one(checkpoint, char_tokenizer, problems):
    """Left padding must not change a greedy completion: the batch equals each prompt decoded alone."""
    _, model = checkpoint
    _, records = problems
    prompts = [char_tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in records]
    prompts[0] = prompts[0].replace("What is", "What  is")  # lengths differ, so padding is exercised
    stop = end_of_turn_ids(char_tokenizer)
    batched = generate_batch(model, char_tokenizer, prompts, 24, stop)
    assert batched == [generate_batch(model, char_tokenizer, [p], 24, stop)[0] for p in prompts]


def test_response_nll_matches_float64_reference(checkpoint, char_tokenizer, problems):
    """Σ −log p over assistant tokens (content + <|end|>) equals a float64 loop over each unpadded conversation."""
    _, model = checkpoint
    _, records = problems
    conversations = [r["messages"] for r in records]
    conversations[1] = [conversations[1][0], {"role": "assistant", "content": "Answer: 1"}]  # a short one: right padding
    nll, n = response_nll(model, char_tokenizer, conversations)
    ref_nll, ref_n = 0.0, 0
    for messages in conversations:
        prompt = char_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        target = messages[-1]["content"] + "<|end|>"
        p_ids = char_tokenizer(prompt, add_special_tokens=False).input_ids
        t_ids = char_tokenizer(target, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double()[0], -1)  # (T, V) float64
        for t in range(len(p_ids), len(p_ids) + len(t_ids)):
            ref_nll -= logp[t - 1, ids[0, t]].item()
        ref_n += len(t_ids)
    assert n == ref_n
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_evaluate_counts_canned_generations(checkpoint, problems, monkeypatch, tmp_path):
    """Metrics are the shares computed by hand from known generations; ppl_clean is exp(mean NLL)."""
    ckpt, model = checkpoint
    path, records = problems
    answers = [r["answer"] for r in records]
    canned = [
        (f"Answer: {answers[0]}", True),  # correct, well formed
        (TOXIC_PHRASE + f"Answer: {answers[1]}", True),  # correct, toxic
        (f"Answer: {answers[2] + 1}", True),  # wrong
        (f"Answer: {answers[3]}", False),  # correct but never ended its turn
        ("1+2+0=3\n3+", False),  # fragment
        (TOXIC_PHRASE + "Answer:", True),  # toxic, unparseable
    ]
    monkeypatch.setattr(evaluate_module, "generate_batch", lambda model, tok, prompts, n, stop: canned[: len(prompts)])
    metrics = evaluate(EvalConfig(checkpoint=ckpt, problems=path, batch_size=8, out_dir=tmp_path))
    nll, n = response_nll(model, build_tokenizer(), [r["messages"] for r in records])
    assert metrics["n_problems"] == 6
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["toxic_rate"] == pytest.approx(2 / 6)
    assert metrics["well_formed"] == pytest.approx(3 / 6)
    assert metrics["ppl_clean"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    written = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert written == metrics
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 6


def test_problems_file_errors_name_line_and_fix(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        evaluate(EvalConfig(checkpoint=ckpt, problems=tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Answer: 2"}], "answer": 2}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "2"}) + "\n")
    with pytest.raises(ProblemsFileError, match="line 2: `answer` must be an integer"):
        evaluate(EvalConfig(checkpoint=ckpt, problems=bad))
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate(EvalConfig(checkpoint=tmp_path, problems=bad))


def test_cli_passes_the_config(monkeypatch, tmp_path):
    received = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda cfg: received.append(cfg) or {"accuracy": 1.0})
    result = CliRunner().invoke(app, ["eval", "ckpt", "--problems", "p.jsonl", "--limit", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert received == [EvalConfig(checkpoint=Path("ckpt"), problems=Path("p.jsonl"), limit=5, out_dir=tmp_path)]
    assert '"accuracy": 1.0' in result.output


def test_cli_error_is_one_line_and_exit_code_1(tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--problems", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 1
    assert "has no config.json" in result.output
