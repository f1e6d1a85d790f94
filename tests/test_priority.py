"""Φ library and spec grammar: every term against hand-computed values, parser errors, product semantics,
schedules, global resolution. Run: .venv/bin/pytest -q tests/test_priority.py
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from scoring.priority import (
    PrioritySpecError,
    check_offline,
    default_normalize,
    evaluate_priority,
    parse_priority,
    resolve_global,
)

NAN = float("nan")
LABEL_NAMES = ["toxic", "good", "other"]


def batch() -> dict[str, torch.Tensor]:
    """Two rows (positions 0-5 and 6-9); position 0 of each row has no prediction (NaN statistics, masked).

    Dyadic values, so float32 arithmetic is exact and every expected value below is computed by hand:
        NLL_ref  = [_, .25, .5, 1, 2, .25, _, .125, 3, .5]
        excess   = ref_logprob − base_logprob = [_, .5, −.25, 1, .5, 0, _, 1, 0, 1]
        rho1 excess = NLL_student − NLL_ref   = [_, .75, .25, 0, 0, .25, _, .125, 1, 0]
    """
    return {
        "loss_mask": torch.tensor([0, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "seq_index": torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),
        "ref_logprob": torch.tensor([NAN, -0.25, -0.5, -1.0, -2.0, -0.25, NAN, -0.125, -3.0, -0.5]),
        "base_logprob": torch.tensor([NAN, -0.75, -0.25, -2.0, -2.5, -0.25, NAN, -1.125, -3.0, -1.5]),
        "ref_entropy": torch.tensor([NAN, 0.75, 1.5, 3.0, 6.0, 0.0, NAN, 1.5, 2.25, 0.375]),
        "weight": torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 2.0, 0.0, 1.0, 1.0, -1.0]),
        "label": torch.tensor([-1, -1, 0, 1, -1, 2, -1, 0, -1, -1]),  # toxic at 2 and 7, good at 3, other at 5
        "student_logprob": torch.tensor([0.0, -1.0, -0.75, -1.0, -2.0, -0.5, 0.0, -0.25, -4.0, -0.5]),
        "student_entropy": torch.tensor([0.0, 3.0, 1.5, 0.0, 6.0, 0.75, 0.0, 1.5, 2.25, 0.375]),
    }


def phi(spec: str, step: int = 0, tokens=None) -> list[float]:
    return evaluate_priority(parse_priority(spec), tokens or batch(), step=step, label_names=LABEL_NAMES).tolist()


def masked(values: list[float]) -> list[float]:
    """Zero positions 0 and 6 (off the loss mask)."""
    return [0.0 if i in (0, 6) else v for i, v in enumerate(values)]


# ----------------------------------------------------------------------------------------------
# Terms against hand-computed values

E = math.exp
TERM_CASES = [
    ("uniform", masked([1.0] * 10)),
    ("stored", [0.0, 1.0, 0.5, 1.0, 0.0, 2.0, 0.0, 1.0, 1.0, -1.0]),
    ("0.5", masked([0.5] * 10)),
    # 1[NLL > min_nll], strict
    ("highpass", [0, 0, 1, 1, 1, 0, 0, 0, 1, 1]),
    ("highpass(min_nll=0.5)", [0, 0, 0, 1, 1, 0, 0, 0, 1, 0]),
    ("highpass(min_nll=0.3, source=base)", [0, 1, 0, 1, 1, 0, 0, 1, 1, 1]),
    # global: 1[excess ≥ threshold]
    ("topk(k=0.6, threshold=0.5)", [0, 1, 0, 1, 1, 0, 0, 1, 0, 1]),
    # row 0 candidates excess [.5, −.25, 1, .5, 0]: ⌈0.5·5⌉ = 3 kept; row 1 [1, 0, 1]: ⌈1.5⌉ = 2 kept
    ("topk(k=0.5, scope=sequence)", [0, 1, 0, 1, 1, 0, 0, 1, 0, 1]),
    # ⌈0.4·5⌉ = 2: positions 3 (1.0) and 1 (0.5; ties position 4 and wins as the earlier one)
    ("topk(k=0.4, scope=sequence)", [0, 1, 0, 1, 0, 0, 0, 1, 0, 1]),
    # ranks NLL_ref: row 0 [.25, .5, 1, 2, .25] keeps 3 → positions 2, 3, 4; row 1 [.125, 3, .5] keeps 8, 9
    ("topk(k=0.5, score=nll, scope=sequence)", [0, 0, 1, 1, 1, 0, 0, 0, 1, 1]),
    # u = min(H / 3, 1) = [_, .25, .5, 1, 1, 0, _, .5, .75, .125]
    ("entropy", masked([0, 0.25, 0.5, 1.0, 1.0, 0.0, 0, 0.5, 0.75, 0.125])),
    ("entropy(direction=down, alpha=2)", masked([0, 0.5625, 0.25, 0.0, 0.0, 1.0, 0, 0.25, 0.0625, 0.765625])),
    ("entropy(alpha=0.5, max_nats=6)", masked([0, 0.125**0.5, 0.25**0.5, 0.5**0.5, 1.0, 0.0, 0, 0.25**0.5, 0.375**0.5, 0.0625**0.5])),
    # clip(exp(excess), 0.8, 2): e^.5, e^−.25 → 0.8, e^1 → 2, e^.5, 1, 2, 1, 2
    ("importance(min=0.8, max=2)", masked([0, E(0.5), 0.8, 2.0, E(0.5), 1.0, 0, 2.0, 1.0, 2.0])),
    ("importance", masked([0, E(0.5), E(-0.25), 2.0, E(0.5), 1.0, 0, 2.0, 1.0, 2.0])),
    # toxic → −1, good → 2, other (not named) → 1, unlabelled → 1
    ("labels(toxic=-1, good=2)", masked([1, 1, -1, 2, 1, 1, 1, -1, 1, 1])),
    ("forgetting(threshold=0.5)", masked([0, 1, -1, 1, 1, -1, 0, 1, -1, 1])),
    # 8 candidates, ⌈0.6·8⌉ = 5: excess .75 (1), .25 (2), .25 (5), .125 (7), 1 (8)
    ("rho1(k=0.6)", [0, 1, 1, 0, 0, 1, 0, 1, 1, 0]),
    # ⌈0.375·8⌉ = 3: positions 8, 1 and 2 (2 ties 5 at .25 and wins as the earlier one)
    ("rho1(k=0.375)", [0, 1, 1, 0, 0, 0, 0, 0, 1, 0]),
    ("dft", masked([0, E(-1), E(-0.75), E(-1), E(-2), E(-0.5), 0, E(-0.25), E(-4), E(-0.5)])),
    # u = [_, 1, .5, 0, 1, .25, _, .5, .75, .125]
    ("student_entropy(direction=down)", masked([0, 0.0, 0.5, 1.0, 0.0, 0.75, 0, 0.5, 0.25, 0.875])),
    ("clip(labels(toxic=-1, good=2), min=-0.5, max=1.5)", masked([1, 1, -0.5, 1.5, 1, 1, 1, -0.5, 1, 1])),
    ("0.5 * stored", [0.0, 0.5, 0.25, 0.5, 0.0, 1.0, 0.0, 0.5, 0.5, -0.5]),
    ("stored * dft", [0.0, E(-1), 0.5 * E(-0.75), E(-1), 0.0, 2 * E(-0.5), 0.0, E(-0.25), E(-4), -E(-0.5)]),
]


@pytest.mark.parametrize("spec, expected", TERM_CASES, ids=[case[0] for case in TERM_CASES])
def test_term_values_match_hand_computed(spec, expected):
    got = torch.tensor(phi(spec), dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k, n", [(k, n) for k in (0.1, 0.3, 0.6, 0.7, 1.0) for n in (1, 3, 10, 37)] + [(0.55, 100), (0.07, 100)])
def test_rho1_selects_exactly_ceil_k_n(k, n):
    """Exactly ⌈k·N⌉ selected, also where the float product is off (0.55 · 100 = 55.00000000000001)."""
    generator = torch.Generator().manual_seed(n)
    tokens = {
        "loss_mask": torch.ones(n, dtype=torch.bool),
        "ref_logprob": -torch.rand(n, generator=generator),
        "student_logprob": -torch.rand(n, generator=generator),
    }
    selected = evaluate_priority(parse_priority(f"rho1(k={k})"), tokens)
    assert int(selected.sum()) == math.ceil(Fraction(str(k)) * n)
    excess = -tokens["student_logprob"] + tokens["ref_logprob"]
    if not selected.bool().all():
        assert excess[selected.bool()].min() > excess[~selected.bool()].max()


def test_rho1_ties_go_to_earlier_positions():
    tokens = {"loss_mask": torch.ones(6, dtype=torch.bool), "ref_logprob": torch.zeros(6), "student_logprob": torch.full((6,), -1.0)}
    assert evaluate_priority(parse_priority("rho1(k=0.5)"), tokens).tolist() == [1, 1, 1, 0, 0, 0]


# ----------------------------------------------------------------------------------------------
# Product semantics: selection acts only where the other factors are > 0


def test_negative_tokens_are_never_deselected():
    # toxic positions 2 and 7 keep −1 whatever highpass says (position 7 has NLL 0.125 < 0.3)
    assert phi("highpass(min_nll=0.3) * labels(toxic=-1)") == [0, 0, -1, 1, 1, 0, 0, -1, 1, 1]
    assert phi("-1 * highpass") == masked([-1.0] * 10)


def test_selection_chooses_among_positive_tokens_only():
    # candidates 1, 3, 4, 5, 8, 9 (toxic 2 and 7 are not): ⌈0.5·6⌉ = 3 → 8 (1), 1 (.75), 5 (.25)
    assert phi("rho1(k=0.5) * labels(toxic=-1)") == [0, 1, -1, 0, 0, 1, 0, -1, 1, 0]
    # a zero factor leaves no candidates: nothing selected, nothing negative
    assert phi("labels(toxic=0) * rho1(k=0.5)") == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    assert phi("0 * rho1(k=0.5)") == [0.0] * 10


def test_selection_inside_a_schedule_still_gates():
    # warmup at half-way: selected → 1, unselected positive → 0.5, toxic → −1 (never blended away)
    assert phi("warmup(rho1(k=0.5), steps=10) * labels(toxic=-1)", step=5) == [0, 1, -1, 0.5, 0.5, 1, 0, -1, 1, 0.5]


# ----------------------------------------------------------------------------------------------
# Schedules over optimizer steps


@pytest.mark.parametrize(
    "step, expected",
    [(0, masked([1.0] * 10)), (25, masked([0, 0.75, 1, 1, 1, 0.75, 0, 0.75, 1, 1])), (100, masked([0, 0, 1, 1, 1, 0, 0, 0, 1, 1])), (250, masked([0, 0, 1, 1, 1, 0, 0, 0, 1, 1]))],
)
def test_warmup_blends_uniform_into_the_expression(step, expected):
    assert phi("warmup(highpass(min_nll=0.3), steps=100)", step=step) == expected


@pytest.mark.parametrize("step, negative", [(0, 0.0), (10, 0.0), (20, -0.125), (30, -0.25), (1000, -0.25)])
def test_ramp_scales_negative_priority_only(step, negative):
    # forgetting(threshold=0.5) = [_, 1, −1, 1, 1, −1, _, 1, −1, 1]; λ = 0.25 · clip((step − 10) / 20, 0, 1)
    expected = masked([0, 1, negative, 1, 1, negative, 0, 1, negative, 1])
    assert phi("ramp(forgetting(threshold=0.5), start=10, end=30, scale=0.25)", step=step) == expected


def test_switch_changes_expression_at_the_step():
    assert phi("switch(uniform, highpass(min_nll=0.3), at=5)", step=4) == masked([1.0] * 10)
    assert phi("switch(uniform, highpass(min_nll=0.3), at=5)", step=5) == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------
# Parser: canonical text, round trip, errors with positions

ROUND_TRIP = [
    "uniform",
    "uniform()",
    "stored",
    "highpass(min_nll=0.3)",
    "topk(k=0.6, scope=sequence)",
    "topk(k=0.6, threshold=0.8125)",
    "topk(threshold=-1.2345678e-05, ref=ref2, base=base)",
    "entropy(alpha=2, direction=down, max_nats=10.5, source=base)",
    "importance(min=0.2, max=1.8)",
    "labels(toxic=-1, hallucinated-fact=-0.5, good=2)",
    "forgetting(rho=0.7, threshold=0.1)",
    "rho1(k=0.6) * labels(toxic=-1)",
    "0.5 * labels(toxic=-1)",
    "stored * dft",
    "student_entropy(alpha=0.5)",
    "clip(stored * importance, min=-1, max=1)",
    "warmup(rho1(k=0.6), steps=200)",
    "ramp(forgetting(threshold=0.5), end=1000, scale=0.25)",
    "switch(uniform, rho1(k=0.6, scope=micro), at=500) * labels(toxic=-1)",
    "  highpass( min_nll = 1e-3 ,source=ref )*0.25 ",
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_canonical_text_reparses_to_itself(spec):
    priority = parse_priority(spec)
    again = parse_priority(priority.text)
    assert again.text == priority.text and again == priority and again.root == priority.root


def test_canonical_text_writes_every_argument():
    assert parse_priority("uniform()").text == "uniform"
    assert parse_priority("highpass").text == "highpass(min_nll=0.3, source=ref)"
    assert parse_priority("topk").text == "topk(k=0.6, score=excess, scope=global, ref=ref, base=base)"
    assert parse_priority("0.5*labels(toxic=-1.0)").text == "0.5 * labels(toxic=-1)"
    assert parse_priority("warmup(dft,steps=200)").text == "warmup(dft, steps=200)"


ERRORS = [  # (spec, column of the caret, words in the message)
    ("", 1, "empty"),
    ("hihgpass", 1, "did you mean 'highpass'"),
    ("highpass(min_nll=-1)", 18, "min_nll must be ≥ 0"),
    ("topk(k=2)", 8, "(0, 1]"),
    ("uniform *", 10, "expected a term or a number"),
    ("rho1(k=0.5", 11, "expected ',' or ')'"),
    ("uniform $ dft", 9, "unexpected character '$'"),
    ("highpass(source=ref, source=base)", 22, "given twice"),
    ("entropy(direction=sideways)", 19, "choose one of: up, down"),
    ("clip(uniform, max=1, highpass)", 22, "follows a keyword"),
    ("labels(toxic=bad)", 14, "needs a number"),
    ("labels()", 1, "at least one label"),
    ("warmup(uniform, steps=0.5)", 23, "whole number"),
    ("uniform uniform", 9, "join factors with '*'"),
    ("topk(kk=0.5)", 6, "unknown argument 'kk'"),
    ("1e999", 1, "not finite"),
    ("switch(uniform, dft)", 1, "needs the argument at="),
    ("ramp(uniform, start=5, end=5)", 28, "end must be > start"),
    ("importance(min=3)", 16, "0 ≤ min ≤ max"),
    ("highpass(source=re-f)", 17, "not a statistics prefix"),
    ("0.5 * (uniform)", 7, "expected a term or a number"),
    ("highpass(min_nll=)", 18, "expected a number or a name"),
    ("highpass(0.3)", 1, "keyword arguments only"),
    ("clip(uniform)", 1, "needs min= or max="),
    ("topk(scope=sequence, threshold=1)", 32, "scope=global only"),
    ("topk(scope=0.5)", 12, "needs a name"),
]


@pytest.mark.parametrize("spec, column, words", ERRORS, ids=[case[0] or "empty" for case in ERRORS])
def test_malformed_spec_names_the_position(spec, column, words):
    with pytest.raises(PrioritySpecError) as info:
        parse_priority(spec)
    message = str(info.value)
    assert words in message
    assert f"column {column} of the priority spec" in message
    lines = message.splitlines()
    spec_line = lines.index(f"  {spec}")
    assert lines[spec_line + 1] == "  " + " " * (column - 1) + "^"
    assert isinstance(info.value, ValueError)


def test_missing_column_is_refused_with_the_command_that_makes_it():
    with pytest.raises(PrioritySpecError, match=r"needs column 'base_logprob'.*\n.*\n.*\n.*tokenprio add-model SHARDS --model BASE --prefix base --out NEW"):
        parse_priority("uniform * topk(k=0.6)", {"ref_logprob", "ref_entropy", "weight"})
    with pytest.raises(PrioritySpecError, match="needs column 'label'"):
        parse_priority("labels(toxic=-1)", {"weight"})
    with pytest.raises(PrioritySpecError, match="needs column 'ref_logprob'"):
        parse_priority("rho1", {"weight"})
    assert parse_priority("stored * dft", {"weight"}).columns == {"weight"}


# ----------------------------------------------------------------------------------------------
# Static properties and the normaliser they imply

PROPERTIES = [  # spec, columns, online, has_schedule, can_be_negative, has_selection, unresolved, normalize
    ("uniform", set(), False, False, False, False, 0, "tokens"),
    ("entropy", {"ref_entropy"}, False, False, False, False, 0, "tokens"),
    ("dft", set(), True, False, False, False, 0, "tokens"),
    ("highpass(min_nll=0.3)", {"ref_logprob"}, False, False, False, True, 0, "selected"),
    ("topk(k=0.6)", {"ref_logprob", "base_logprob"}, False, False, False, True, 1, "selected"),
    ("topk(k=0.6, scope=sequence)", {"ref_logprob", "base_logprob"}, False, False, False, True, 0, "selected"),
    ("warmup(rho1(k=0.6), steps=200)", {"ref_logprob"}, True, True, False, True, 0, "selected"),
    ("labels(toxic=-1)", {"label"}, False, False, True, False, 0, "per_sign"),
    ("labels(good=2)", {"label"}, False, False, False, False, 0, "tokens"),
    ("rho1(k=0.6) * labels(toxic=-1)", {"ref_logprob", "label"}, True, False, True, True, 0, "per_sign"),
    ("forgetting", {"ref_logprob", "base_logprob"}, False, False, True, True, 1, "per_sign"),
    ("stored * dft", {"weight"}, True, False, True, False, 0, "per_sign"),
    ("clip(labels(toxic=-1), min=0)", {"label"}, False, False, False, False, 0, "tokens"),
    ("clip(uniform, max=-0.5)", set(), False, False, True, False, 0, "per_sign"),
    ("topk * forgetting(threshold=1) * importance", {"ref_logprob", "base_logprob"}, False, False, True, True, 1, "per_sign"),
]


@pytest.mark.parametrize("spec, columns, online, schedule, negative, selection, unresolved, normalize", PROPERTIES)
def test_static_properties(spec, columns, online, schedule, negative, selection, unresolved, normalize):
    priority = parse_priority(spec)
    assert priority.columns == columns
    assert (priority.online, priority.has_schedule, priority.can_be_negative, priority.has_selection) == (online, schedule, negative, selection)
    assert len(priority.unresolved_global) == unresolved
    assert default_normalize(priority) == normalize


def test_terms_exposes_arguments_for_the_trainer():
    priority = parse_priority("warmup(rho1(k=0.5, scope=micro), steps=10)")
    assert priority.terms("rho1") == [{"k": 0.5, "scope": "micro", "ref": "ref"}]
    assert parse_priority("topk").unresolved_global == ["topk(k=0.6, score=excess, scope=global, ref=ref, base=base)"]


STUDENT_PROPERTIES = [
    ("uniform", set(), False),
    ("stored * highpass * topk(threshold=0.5) * labels(toxic=-1)", set(), False),
    ("rho1", {"student_logprob"}, True),
    ("rho1(k=0.5, scope=micro)", {"student_logprob"}, False),
    ("stored * dft", {"student_logprob"}, False),
    ("student_entropy(direction=down)", {"student_entropy"}, False),
    ("warmup(rho1(scope=micro), steps=5) * student_entropy", {"student_logprob", "student_entropy"}, False),
    ("switch(dft, rho1(k=0.6), at=10)", {"student_logprob"}, True),
    ("rho1(k=0.3, scope=micro) * clip(rho1(k=0.5), max=1)", {"student_logprob"}, True),
]


@pytest.mark.parametrize("spec, student_columns, global_online", STUDENT_PROPERTIES)
def test_student_columns_and_global_online_selection(spec, student_columns, global_online):
    priority = parse_priority(spec)
    assert isinstance(priority.student_columns, frozenset) and priority.student_columns == student_columns
    assert priority.global_online_selection is global_online
    assert priority.online == bool(student_columns)
    # exactly these student columns are what evaluation needs
    without = {k: v for k, v in batch().items() if not k.startswith("student_") or k in student_columns}
    evaluate_priority(priority, without, step=3, label_names=LABEL_NAMES)
    for column in student_columns:
        tokens = {k: v for k, v in without.items() if k != column}
        with pytest.raises(ValueError, match=f"needs token columns \\['{column}'\\]"):
            evaluate_priority(priority, tokens, step=3, label_names=LABEL_NAMES)


# ----------------------------------------------------------------------------------------------
# Global resolution


def ranked_batches(values: list[float], split: int):
    """Batches whose excess score is `values` (ref_logprob = 0, base_logprob = −value), plus a masked position 0."""
    for chunk in (values[:split], values[split:]):
        n = len(chunk) + 1
        yield {
            "loss_mask": torch.tensor([False] + [True] * len(chunk)),
            "seq_index": torch.zeros(n, dtype=torch.int64),
            "ref_logprob": torch.tensor([NAN] + [0.0] * len(chunk)),
            "base_logprob": torch.tensor([NAN] + [-v for v in chunk]),
            "label": torch.tensor([-1] + [0 if v in (9.0, 10.0) else -1 for v in chunk]),
        }


VALUES = [3.0, 7.0, 1.0, 10.0, 5.0, 8.0, 2.0, 6.0, 9.0, 4.0]


@pytest.mark.parametrize("spec, threshold, kept", [("topk(k=0.6)", 5.0, 6), ("topk(k=0.25)", 8.0, 3), ("forgetting(rho=0.7)", 4.0, 7)])
def test_resolve_global_keeps_exactly_the_top_fraction(spec, threshold, kept):
    resolved = resolve_global(parse_priority(spec), ranked_batches(VALUES, 4))  # a one-pass generator
    assert f"threshold={threshold:g}" in resolved.text and not resolved.unresolved_global
    assert parse_priority(resolved.text) == resolved
    values = torch.cat([evaluate_priority(resolved, b)[1:] for b in ranked_batches(VALUES, 4)])
    assert int((values > 0).sum()) == kept
    assert torch.equal(values > 0, torch.tensor(VALUES) >= threshold)
    if spec.startswith("forgetting"):
        assert int((values < 0).sum()) == len(VALUES) - kept


def test_resolve_global_ranks_only_candidates_and_resolves_all_terms_in_one_pass():
    # 9 and 10 are toxic (Φ = −1): candidates are the 8 others; ⌈0.5·8⌉ = 4 → threshold 5 (8, 7, 6, 5)
    spec = "topk(k=0.5) * forgetting(rho=0.25) * labels(toxic=-1)"
    resolved = resolve_global(parse_priority(spec), ranked_batches(VALUES, 6), label_names=["toxic"])
    assert resolved.text == (
        "topk(k=0.5, score=excess, scope=global, threshold=5, ref=ref, base=base)"
        " * forgetting(rho=0.25, threshold=7, ref=ref, base=base) * labels(toxic=-1)"
    )
    values = torch.cat([evaluate_priority(resolved, b, label_names=["toxic"])[1:] for b in ranked_batches(VALUES, 6)])
    # topk keeps ≥ 5; forgetting sends ≥ 7 to +1 and the rest to −1; toxic stays −1
    expected = [0.0 if v < 5 else (1.0 if v >= 7 else -1.0) for v in VALUES]
    expected = [-1.0 if v in (9.0, 10.0) else e for v, e in zip(VALUES, expected)]
    assert values.tolist() == expected


def test_resolve_and_evaluate_refusals():
    with pytest.raises(PrioritySpecError, match="rho1 needs the student"):
        resolve_global(parse_priority("topk * rho1"), ranked_batches(VALUES, 4))
    with pytest.raises(PrioritySpecError, match="needs a corpus-wide threshold"):
        evaluate_priority(parse_priority("topk(k=0.6)"), batch())
    with pytest.raises(ValueError, match="no candidate tokens"):
        resolve_global(parse_priority("topk * 0"), ranked_batches(VALUES, 4))


# ----------------------------------------------------------------------------------------------
# Offline refusal, input validation, Φ = 0 off the mask and never NaN


@pytest.mark.parametrize("spec, word", [("stored * dft", "dft needs the student"), ("warmup(stored, steps=5)", "warmup changes Φ"), ("rho1", "rho1 needs")])
def test_offline_commands_refuse_online_terms_and_schedules(spec, word):
    with pytest.raises(PrioritySpecError, match=word):
        check_offline(parse_priority(spec), "reweight")
    check_offline(parse_priority("highpass * labels(toxic=-1) * topk(threshold=0.5)"), "reweight")


def test_online_term_without_student_columns_names_the_fix():
    tokens = {k: v for k, v in batch().items() if not k.startswith("student")}
    with pytest.raises(ValueError, match=r"\['student_logprob'\].*tokenprio train"):
        evaluate_priority(parse_priority("dft"), tokens)


def test_bad_inputs_are_refused():
    tokens = batch()
    tokens["ref_logprob"][3] = NAN
    with pytest.raises(ValueError, match="'ref_logprob' is NaN at 1 loss_mask position"):
        evaluate_priority(parse_priority("highpass"), tokens)
    with pytest.raises(ValueError, match="pass label_names"):
        evaluate_priority(parse_priority("labels(toxic=-1)"), batch())
    with pytest.raises(ValueError, match="label code 2 has no name"):
        evaluate_priority(parse_priority("labels(toxic=-1)"), batch(), label_names=["toxic"])


FUZZ_SPECS = [
    "uniform", "stored", "highpass", "topk(threshold=0.1)", "topk(k=0.3, scope=sequence)", "entropy(direction=down)",
    "importance(min=0, max=100)", "labels(toxic=-1, good=0.5)", "forgetting(threshold=0)", "rho1(k=0.6)", "dft",
    "student_entropy", "clip(stored * importance, min=-1, max=1)", "warmup(rho1, steps=7)",
    "ramp(forgetting(threshold=0.2) * labels(toxic=-2), end=9, scale=0.25)", "switch(dft, topk(k=0.2, scope=sequence), at=3)",
    "rho1(k=0.3) * highpass(min_nll=0.5) * labels(toxic=-1) * stored * -0.5",
]


@pytest.mark.parametrize("spec", FUZZ_SPECS)
def test_phi_is_zero_off_mask_and_never_nan(spec):
    generator = torch.Generator().manual_seed(0)
    n = 64
    mask = torch.rand(n, generator=generator) < 0.7
    tokens = {
        "loss_mask": mask,
        "seq_index": torch.arange(n) // 16,
        "ref_logprob": torch.where(mask, -torch.rand(n, generator=generator) * 60, NAN),  # p_ref/p_base up to e^60
        "base_logprob": torch.where(mask, -torch.rand(n, generator=generator) * 60, NAN),
        "ref_entropy": torch.where(mask, torch.rand(n, generator=generator) * 8, NAN),
        "weight": torch.where(mask, torch.randn(n, generator=generator), 0.0),
        "label": torch.randint(-1, 3, (n,), generator=generator),
        "student_logprob": torch.where(mask, -torch.rand(n, generator=generator) * 60, NAN),  # garbage off the mask
        "student_entropy": torch.where(mask, torch.rand(n, generator=generator) * 8, NAN),
    }
    for step in (0, 4, 100):
        values = evaluate_priority(parse_priority(spec), tokens, step=step, label_names=LABEL_NAMES)
        assert values.dtype == torch.float32 and values.shape == (n,)
        assert not torch.isnan(values).any()
        assert torch.all(values[~mask] == 0)


def test_worked_examples_in_the_docs_parse():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "priority.md").read_text()
    examples = re.findall(r"^\d\. `([^`]+)`", docs.split("## Worked examples")[1], flags=re.M)
    assert len(examples) == 8
    for spec in examples:
        priority = parse_priority(spec.replace("threshold=T", "threshold=0.5"))
        assert parse_priority(priority.text) == priority
