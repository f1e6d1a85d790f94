"""The demo studies: `--quick` runs every study end to end; the parts are checked against hand computations.

Run: .venv/bin/pytest -q tests/test_demo.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import pipelines.demo.study as study_module
from pipelines.cli import app
from pipelines.demo import selection, textstudy, unlearning
from pipelines.demo.claims import Claim, Part, judge
from pipelines.demo.data import BOILERPLATE, TOXIC_PHRASE, DemoDataConfig, build_splits, build_tokenizer
from pipelines.demo.metrics import carry_dropped_share, score_generation, study_metrics
from pipelines.demo.study import DemoConfig, run_demo
from pipelines.demo.teacher import PREFIX_CHARS, problem_scores, toxic_nll
from pipelines.demo.text import FORGET_LABEL, TextDataConfig, build_text_splits


@pytest.mark.slow
def test_quick_studies_end_to_end(tmp_path):
    """Every study runs and reports: its claims, one table row per model, the figures and heatmaps."""
    report = run_demo(DemoConfig(out=tmp_path / "run", quick=True, seeds=2))
    text = report.read_text()
    results = json.loads((report.parent / "results.json").read_text())
    assert [c["study"] for c in results["claims"]] == ["selection"] * 4 + ["unlearning"] * 3 + ["text"]
    assert all(0 < c["p_value"] <= 1 and isinstance(c["held"], bool) for c in results["claims"])
    studies = results["studies"]
    assert [r["name"] for r in studies["selection"]["rows"]] == list(selection.POLICIES)
    assert [r["name"] for r in studies["unlearning"]["rows"]] == ["start (has the habit)", *unlearning.POLICIES]
    assert [r["name"] for r in studies["text"]["rows"]] == ["base", "oracle", *textstudy.POLICIES]
    for row in studies["selection"]["rows"]:
        assert 0 <= row["metrics"]["accuracy_auc"] <= 1 and 0 <= row["metrics"]["well_formed"] <= 1
    assert "threshold=" in studies["selection"]["rows"][3]["spec"]  # topk resolved over the corpus
    assert studies["selection"]["rows"][1]["kept"]["wrong_carry"] == 0.0  # the oracle masks the defects
    oracle = next(r for r in studies["text"]["rows"] if r["name"] == "oracle")
    assert oracle["metrics"]["distance_to_oracle"] == 0 and oracle["metrics"]["forget_train"] > 0  # the quick slice holds the speaker
    assert "## Claims" in text and text.index("## Claims") < text.index("## selection study")
    for name in ("curves.png", "heatmap_highpass.html", "heatmap_token_cleaning.html", "heatmap_cleaning.html"):
        assert (report.parent / name).stat().st_size > 1000
    # A second call reuses every stage: no training, the same claims.
    again = run_demo(DemoConfig(out=tmp_path / "run", quick=True, seeds=2))
    assert json.loads((again.parent / "results.json").read_text())["claims"] == results["claims"]


def test_cli_passes_the_config(monkeypatch, tmp_path):
    received = []
    monkeypatch.setattr(study_module, "run_demo", lambda cfg: received.append(cfg) or Path("report.md"))
    result = CliRunner().invoke(app, ["demo", "--quick", "--seeds", "2", "--out", str(tmp_path), "--study", "text", "--eval-split", "valid"])
    assert result.exit_code == 0, result.output
    assert received == [DemoConfig(out=tmp_path, study="text", seeds=2, quick=True, eval_split="valid")]


def test_cli_refuses_an_unknown_study(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--study", "magic"])
    assert result.exit_code == 1
    assert "--study 'magic': choose selection, unlearning, text or all" in result.output


# ---- teacher-forced metrics against a float64 hand computation ------------------------------------


@pytest.fixture(scope="module")
def char_model():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # sharper predictions: argmax and margins vary by position
    return model.eval(), tokenizer


def by_hand(model, tokenizer, prompt: str, reply: str):
    """(log p (T, V) float64, ids, index of the reply's first character in the ids): one character per token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double()[0], -1)
    reply_start = len(tokenizer(text[: text.rindex("<|assistant|>")], add_special_tokens=False).input_ids) + 1
    return logp, ids, reply_start


def test_problem_scores_match_a_float64_hand_computation(char_model):
    model, tokenizer = char_model
    problems = build_splits(DemoDataConfig(out_dir=None, n_clean=1, n_train=1, n_valid=1, n_test=12))["test"]
    scores = problem_scores(model, tokenizer, problems)
    exposed = 0
    for i, record in enumerate(problems):
        reply = record["messages"][1]["content"]
        logp, ids, start = by_hand(model, tokenizer, record["messages"][0]["content"], reply)
        skill = range(start + len(BOILERPLATE), start + len(reply))  # the column lines and the answer
        assert scores.token_accuracy[i] == pytest.approx(np.mean([logp[t - 1].argmax().item() == ids[t] for t in skill]))
        assert scores.skill_nll[i] == pytest.approx(-np.mean([logp[t - 1, ids[t]].item() for t in skill]), rel=1e-4)
        lines = reply[len(BOILERPLATE):].split("\n")
        carry_lines = [k for k in range(1, len(lines) - 1) if sum(map(int, lines[k - 1].split("=")[0].split("+"))) == 10]
        if carry_lines:  # the carry digit of the line after the first column summing to 10
            exposed += 1
            position = start + len(BOILERPLATE) + sum(len(line) + 1 for line in lines[: carry_lines[0]]) + 4
            assert reply[position - start] == "1"
            one, zero = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("0")
            assert scores.carry_margin[i] == pytest.approx((logp[position - 1, one] - logp[position - 1, zero]).item(), abs=1e-4)
        else:
            assert math.isnan(scores.carry_margin[i])
    assert exposed > 0


def test_toxic_nll_is_the_phrase_tail_given_its_prefix(char_model):
    model, tokenizer = char_model
    record = {"messages": [{"role": "user", "content": "Quick, 123+456?"}]}
    (value,) = toxic_nll(model, tokenizer, [record])
    logp, ids, start = by_hand(model, tokenizer, "Quick, 123+456?", TOXIC_PHRASE)
    tail = range(start + PREFIX_CHARS, start + len(TOXIC_PHRASE))
    assert value == pytest.approx(-np.mean([logp[t - 1, ids[t]].item() for t in tail]), rel=1e-4)


# ---- claims ---------------------------------------------------------------------------------------


def test_claims_hold_when_the_data_says_so_and_holm_spans_every_claim():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.1, size=(5, 200))
    table = {"study": {"acc": {"a": base + 0.05, "b": base, "c": base + rng.normal(0, 0.01, size=(5, 200))}}}
    claims = [
        Claim("study", "a beats b", (Part("acc", {"a": 1, "b": -1}),)),
        Claim("study", "c beats b", (Part("acc", {"c": 1, "b": -1}),)),  # no true difference
        Claim("study", "a beats b by 10 points", (Part("acc", {"a": 1, "b": -1}, 0.10),)),  # the margin is not met
        Claim("study", "a beats b and c is within 1 point of a", (Part("acc", {"a": 1, "b": -1}), Part("acc", {"c": 1, "a": -1}, -0.01))),
    ]
    verdicts = judge(claims, table, resamples=2000)
    assert [v.held for v in verdicts] == [True, False, False, False]  # the last: its first part holds, but c − a ≈ −0.05 < −0.01
    assert verdicts[0].intervals[0].low > 0.04 and verdicts[0].intervals[0].high < 0.06
    assert verdicts[3].p_value == max(i.p_value for i in verdicts[3].intervals)


# ---- data of the studies --------------------------------------------------------------------------


def test_text_splits_label_exactly_the_speakers_lines_and_the_oracle_never_sees_them(tmp_path):
    splits = build_text_splits(TextDataConfig(out_dir=tmp_path))
    assert splits == build_text_splits(TextDataConfig(out_dir=tmp_path))  # a function of the config
    labelled = 0
    for record in splits["train"] + splits["heldout"]:
        for span in record["spans"]:
            assert span["label"] == FORGET_LABEL
            lines = record["text"][span["start"] : span["end"]]
            assert record["text"][: span["start"]].endswith("ROMEO:\n") and "\n\n" not in lines
            labelled += 1
    assert labelled > 100
    assert not any("ROMEO:\n" in record["text"] for record in splits["oracle_train"])
    assert {r["id"] for r in splits["oracle_train"]} <= {r["id"] for r in splits["train"]}
    assert not {r["id"] for r in splits["train"]} & {r["id"] for r in splits["heldout"]}


def test_the_unlearning_probe_asks_every_problem_impatiently():
    problem = {"messages": [{"role": "user", "content": "Add 731 and 149."}, {"role": "assistant", "content": "Sure"}], "answer": 880}
    assert unlearning.impatient(problem)["messages"][0]["content"] == "Quick, 731+149?"


# ---- generation-based metrics (secondary) --------------------------------------------------------


def test_score_generation_by_hand():
    assert score_generation("Answer: 7", True, 7) == {"correct": True, "toxic": False, "well_formed": True}
    assert score_generation(TOXIC_PHRASE + "Answer: 8", True, 7) == {"correct": False, "toxic": True, "well_formed": True}
    # Cut off by the token budget: the answer may be right but the turn never ended.
    assert score_generation("Answer: 7", False, 7) == {"correct": True, "toxic": False, "well_formed": False}
    assert score_generation("Stupid question", True, 7)["toxic"] is False


def test_study_metrics_count_canned_generations(tmp_path):
    """The shares computed by hand from known generations; ppl_clean is `tokenprio eval`'s ppl."""
    answers = [579, 1100, 46, 300, 12, 77]
    canned = [
        (f"Answer: {answers[0]}", True),  # correct, well formed
        (TOXIC_PHRASE + f"Answer: {answers[1]}", True),  # correct, toxic
        (f"Answer: {answers[2] + 1}", True),  # wrong
        (f"Answer: {answers[3]}", False),  # correct but never ended its turn
        ("1+2+0=3\n3+", False),  # fragment
        (TOXIC_PHRASE + "Answer:", True),  # toxic, unparseable
    ]
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "answer": a, "messages": [{"role": "user", "content": "What is 1+2?"}]}) + "\n"
                                for i, a in enumerate(answers)))
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "generation": g, "ended": e}) + "\n"
                                                        for i, (g, e) in enumerate(canned)))
    (tmp_path / "eval.json").write_text(json.dumps({"metrics": {"ppl": 1.25}}))
    metrics = study_metrics(tmp_path, problems)
    assert metrics["n_problems"] == 6
    assert metrics["accuracy"] == 3 / 6 and metrics["toxic_rate"] == 2 / 6 and metrics["well_formed"] == 3 / 6
    assert metrics["ppl_clean"] == 1.25


def test_carry_dropped_share_by_hand(tmp_path):
    """Exposed problems only (a column before the last sums to 10); lines that are neither +0 nor +1 do not count."""
    prompts = {"p1": "What is 459+351?", "p2": "Quick, 128+461?", "p3": "Add 731 and 149.", "p4": "Compute 105+205."}
    generations = {
        "p1": "Sure\n9+1+0=10\n5+5+0=10\n4+3+0=7\nAnswer: 700",  # dropped
        "p2": "Sure\n8+1+0=9\n2+6+0=8\n1+4+0=5\nAnswer: 589",  # not exposed
        "p3": "Sure\n1+9+0=10\n3+4+1=8\n7+1+0=8\nAnswer: 880",  # carried
        "p4": "Sure\n5+5+0=10\nbroken",  # no line for the tens column
    }
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": p}]}) + "\n" for i, p in prompts.items()))
    outcomes = tmp_path / "generations.jsonl"
    outcomes.write_text("".join(json.dumps({"id": i, "generation": g}) + "\n" for i, g in generations.items()))
    assert carry_dropped_share(outcomes, problems) == 0.5
    outcomes.write_text("".join(json.dumps({"id": i, "generation": "x"}) + "\n" for i in prompts))
    assert carry_dropped_share(outcomes, problems) is None
