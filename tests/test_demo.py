"""The demo study: `--quick` runs every stage end to end; the CLI passes exactly the config it was given.

Run: .venv/bin/pytest -q tests/test_demo.py
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import pipelines.demo.study as demo_module
from pipelines.cli import app
from pipelines.demo.data import TOXIC_PHRASE
from pipelines.demo.metrics import carry_dropped_share, score_generation, study_metrics
from pipelines.demo.study import POLICIES, DemoConfig, run_demo


def test_quick_study_end_to_end(tmp_path):
    """Every stage runs; the table has one line per model and sane values (not outcomes: 2 steps of training)."""
    report = run_demo(DemoConfig(out=tmp_path / "run", quick=True))
    lines = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + 2 + len(POLICIES)  # header, separator, reference, warm start, students
    assert all(line.count(" | ") == 11 for line in lines)
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == ["reference (clean data)", "warm start", *POLICIES]

    results = json.loads((report.parent / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    for row in rows.values():
        (metrics,) = row["metrics"]
        assert metrics["n_problems"] == 8
        for key in ("accuracy", "toxic_rate", "well_formed"):
            assert 0.0 <= metrics[key] <= 1.0
        assert 1.0 <= metrics["ppl_clean"] < 1e4
        assert metrics["carry_dropped"] is None or 0.0 <= metrics["carry_dropped"] <= 1.0
    # Token Cleaning trains with a literal threshold resolved over the corpus.
    assert "threshold=" in rows["token_cleaning"]["spec"]
    # Offline Φ by defect label: uniform keeps everything, signed negates exactly the toxic tokens.
    assert rows["uniform"]["kept"] == {"clean": 1.0, "wrong_carry": 1.0, "noise": 1.0, "toxic": 1.0, "toxic_negative": 0.0}
    assert rows["signed"]["kept"]["clean"] == 1.0 and rows["signed"]["kept"]["toxic_negative"] == 1.0
    assert 0.0 < rows["token_cleaning"]["kept"]["clean"] < 1.0
    assert rows["rho1"]["kept"] is None  # online: selected during training
    for name in ("curves_and_phi.png", "heatmap_highpass.html", "heatmap_signed.html", "heatmap_token_cleaning.html"):
        assert (report.parent / name).stat().st_size > 1000


def test_cli_passes_the_config(monkeypatch, tmp_path):
    received = []
    monkeypatch.setattr(demo_module, "run_demo", lambda cfg: received.append(cfg) or Path("report.md"))
    args = ["demo", "--quick", "--seeds", "2", "--out", str(tmp_path), "--policies", "uniform, signed", "--eval-split", "valid"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert received == [DemoConfig(out=tmp_path, seeds=2, quick=True, eval_split="valid", policies=("uniform", "signed"))]


def test_cli_refuses_unknown_policy(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--policies", "uniform,magic"])
    assert result.exit_code == 1
    assert "--policies uniform,magic: choose among uniform, highpass" in result.output


def test_carry_dropped_share_by_hand(tmp_path):
    """Exposed problems only (a column before the last sums to 10); lines that are neither +0 nor +1 do not count."""
    prompts = {"p1": "What is 459+351?", "p2": "Quick, 128+461?", "p3": "Add 731 and 149.", "p4": "Compute 105+205."}
    # p1: 9+1=10 in the ones, so the tens line carries 1 (5+5+1); p2 has no column summing to 10;
    # p3: 1+9=10, tens 3+4; p4: 5+5=10, tens 0+0.
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


def test_score_generation_by_hand():
    assert score_generation("Answer: 7", True, 7) == {"correct": True, "toxic": False, "well_formed": True}
    assert score_generation(TOXIC_PHRASE + "Answer: 8", True, 7) == {"correct": False, "toxic": True, "well_formed": True}
    # Cut off by the token budget: the answer may be right but the turn never ended.
    assert score_generation("Answer: 7", False, 7) == {"correct": True, "toxic": False, "well_formed": False}
    assert score_generation("Stupid question", True, 7)["toxic"] is False


def test_study_metrics_count_canned_generations(tmp_path):
    """The study's shares computed by hand from known generations; ppl_clean is `tokenprio eval`'s ppl."""
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
