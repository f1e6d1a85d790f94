"""The PriFT weight `prift` and the margin form of Token Cleaning `cleaning` (issue 12, item 3): values against
hand-computed ones, products with negative labels, canonical text, errors, properties and the normaliser.

Run: .venv/bin/pytest -q tests/test_priority_prift_cleaning.py
"""

from __future__ import annotations

import math

import pytest
import torch

from scoring.priority import PrioritySpecError, default_normalize, evaluate_priority, parse_offline, parse_priority

NAN = float("nan")
E = math.exp
LABEL_NAMES = ["toxic", "good"]


def batch() -> dict[str, torch.Tensor]:
    """Two rows (positions 0-4 and 5-8); position 0 of each row is off the loss mask (NaN statistics).

        ref_logprob  = [_, −.25, −.5, −1, −2, _, −.125, −3, −.5]
        base_logprob = [_, −.75, −.25, −2, −1.875, _, −1.125, −2.5, −.375]
        s = NLL_base − NLL_ref = ref_logprob − base_logprob = [_, .5, −.25, 1, −.125, _, 1, −.5, −.125]
        labels: toxic at 2 and 7 (both with s < −0.1), good at 3
    """
    return {
        "loss_mask": torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "ref_logprob": torch.tensor([NAN, -0.25, -0.5, -1.0, -2.0, NAN, -0.125, -3.0, -0.5]),
        "base_logprob": torch.tensor([NAN, -0.75, -0.25, -2.0, -1.875, NAN, -1.125, -2.5, -0.375]),
        "label": torch.tensor([-1, -1, 0, 1, -1, -1, -1, 0, -1]),
    }


def phi(spec: str) -> list[float]:
    return evaluate_priority(parse_priority(spec), batch(), label_names=LABEL_NAMES).tolist()


CASES = [
    # p_ref^α = exp(α · ref_logprob)
    ("prift", [0, E(-0.25), E(-0.5), E(-1), E(-2), 0, E(-0.125), E(-3), E(-0.5)]),
    ("prift(alpha=2)", [0, E(-0.5), E(-1), E(-2), E(-4), 0, E(-0.25), E(-6), E(-1)]),
    ("prift(alpha=0.5, source=base)", [0, E(-0.375), E(-0.125), E(-1), E(-0.9375), 0, E(-0.5625), E(-1.25), E(-0.1875)]),
    # 1[s ≥ −δ]: δ = 0.1 drops s = −.25, −.5 and −.125 (positions 2, 7, 4, 8)
    ("cleaning", [0, 1, 0, 1, 0, 0, 1, 0, 0]),
    ("cleaning(delta=0.125)", [0, 1, 0, 1, 1, 0, 1, 0, 1]),  # s = −0.125 ≥ −0.125: kept (≥, inclusive)
    ("cleaning(delta=0.25)", [0, 1, 1, 1, 1, 0, 1, 0, 1]),
    ("cleaning(delta=0)", [0, 1, 0, 1, 0, 0, 1, 0, 0]),
    # roles swapped: s' = −s = [_, −.5, .25, −1, .125, _, −1, .5, .125] ≥ −0.5
    ("cleaning(delta=0.5, ref=base, base=ref)", [0, 1, 1, 0, 1, 0, 0, 1, 1]),
    # products with a negative label: a toxic token stays negative
    ("prift * labels(toxic=-1)", [0, E(-0.25), -E(-0.5), E(-1), E(-2), 0, E(-0.125), -E(-3), E(-0.5)]),
    # toxic 2 and 7 have s < −0.1, so cleaning alone drops them; in the product they keep −1
    ("cleaning * labels(toxic=-1)", [0, 1, -1, 1, 0, 0, 1, -1, 0]),
    ("labels(toxic=-1, good=2) * cleaning(delta=0.125)", [0, 1, -1, 2, 1, 0, 1, -1, 1]),
    # a selection times a weight: p_ref · 1[s ≥ −δ] on positive tokens, −p_ref on toxic ones
    ("cleaning * prift * labels(toxic=-1)", [0, E(-0.25), -E(-0.5), E(-1), 0, 0, E(-0.125), -E(-3), 0]),
    ("labels(toxic=0) * cleaning", [0, 1, 0, 1, 0, 0, 1, 0, 0]),
]


@pytest.mark.parametrize("spec, expected", CASES, ids=[case[0] for case in CASES])
def test_values_match_hand_computed(spec, expected):
    got = torch.tensor(phi(spec), dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_prift_equals_a_float64_reference_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    logprob = -torch.rand(1000, generator=generator) * 20  # (N,) float32 nats, as stored
    tokens = {"loss_mask": torch.ones(1000, dtype=torch.bool), "ref_logprob": logprob}
    for alpha in (0.25, 1.0, 3.0):
        got = evaluate_priority(parse_priority(f"prift(alpha={alpha})"), tokens).double()
        # float32 rounds α·lp (|α·lp| ≤ 60) to ~60 · 2^-24 nats: a relative error ≤ 4e-6 after exp
        torch.testing.assert_close(got, torch.exp(alpha * logprob.double()), rtol=1e-5, atol=0)
        assert bool(((got > 0) & (got <= 1)).all())


def test_cleaning_equals_topk_with_the_threshold_minus_delta():
    """cleaning(delta=δ) ≡ topk(threshold=−δ) token for token, also inside products with negative labels."""
    generator = torch.Generator().manual_seed(1)
    n = 500
    tokens = {
        "loss_mask": torch.rand(n, generator=generator) < 0.8,
        "ref_logprob": -torch.rand(n, generator=generator) * 4,
        "base_logprob": -torch.rand(n, generator=generator) * 4,
        "label": torch.randint(-1, 2, (n,), generator=generator),
    }
    for delta in (0.0, 0.1, 0.7):
        for other in ("", " * labels(toxic=-1)"):
            a = evaluate_priority(parse_priority(f"cleaning(delta={delta}){other}"), tokens, label_names=LABEL_NAMES)
            b = evaluate_priority(parse_priority(f"topk(threshold={-delta}){other}"), tokens, label_names=LABEL_NAMES)
            assert torch.equal(a, b)
    kept = evaluate_priority(parse_priority("cleaning(delta=0.1)"), tokens).bool()
    s = tokens["ref_logprob"] - tokens["base_logprob"]
    assert torch.equal(kept, tokens["loss_mask"] & (s >= -0.1))


def test_cleaning_keeps_what_the_margin_says_not_a_forced_share():
    """On a corpus with 6 % defects (base far better than ref), cleaning drops exactly those; topk(k=0.6) drops 40 %."""
    n = 1000
    s = torch.full((n,), 0.5)
    s[::50] = -2.0  # 20 defects
    s[1::50] = -1.0  # 20 more
    s[2::50] = -3.0  # 20 more: 60 = 6 %
    tokens = {"loss_mask": torch.ones(n, dtype=torch.bool), "ref_logprob": torch.full((n,), -1.0), "base_logprob": -1.0 - s}
    kept = evaluate_priority(parse_offline("cleaning(delta=0.1)", set(tokens), "score"), tokens)
    assert int(kept.sum()) == 940 and torch.equal(kept.bool(), s >= -0.1)


@pytest.mark.parametrize(
    "spec, text",
    [
        ("prift", "prift(alpha=1, source=ref)"),
        ("prift()", "prift(alpha=1, source=ref)"),
        ("prift(source=base, alpha=0.5)", "prift(alpha=0.5, source=base)"),
        ("cleaning", "cleaning(delta=0.1, ref=ref, base=base)"),
        ("cleaning(base=warm, delta=2.5e-2)", "cleaning(delta=0.025, ref=ref, base=warm)"),
        ("cleaning * labels(toxic=-1.0) * prift(alpha=2)", "cleaning(delta=0.1, ref=ref, base=base) * labels(toxic=-1) * prift(alpha=2, source=ref)"),
        ("warmup(cleaning(delta=0), steps=50)", "warmup(cleaning(delta=0, ref=ref, base=base), steps=50)"),
    ],
)
def test_canonical_text_writes_every_argument_and_reparses_to_itself(spec, text):
    priority = parse_priority(spec)
    assert priority.text == text
    again = parse_priority(priority.text)
    assert again.text == text and again.root == priority.root


PROPERTIES = [  # spec, columns, can_be_negative, has_selection, unresolved, normaliser
    ("prift", {"ref_logprob"}, False, False, 0, "tokens"),
    ("prift(source=base)", {"base_logprob"}, False, False, 0, "tokens"),
    ("cleaning", {"ref_logprob", "base_logprob"}, False, True, 0, "selected"),
    ("cleaning * prift", {"ref_logprob", "base_logprob"}, False, True, 0, "selected"),
    ("prift * labels(toxic=-1)", {"ref_logprob", "label"}, True, False, 0, "per_sign"),
    ("cleaning * labels(toxic=-1)", {"ref_logprob", "base_logprob", "label"}, True, True, 0, "per_sign"),
]


@pytest.mark.parametrize("spec, columns, negative, selection, unresolved, normalize", PROPERTIES)
def test_static_properties_and_default_normaliser(spec, columns, negative, selection, unresolved, normalize):
    priority = parse_priority(spec)
    assert priority.columns == columns
    assert (priority.online, priority.can_be_negative, priority.has_selection) == (False, negative, selection)
    assert len(priority.unresolved_global) == unresolved
    assert default_normalize(priority) == normalize


def test_both_are_offline_and_need_no_resolution():
    columns = {"ref_logprob", "base_logprob", "ref_entropy", "weight"}
    for spec in ("prift", "cleaning", "cleaning * prift(alpha=2)"):
        assert parse_offline(spec, columns, "score").text == parse_priority(spec).text


@pytest.mark.parametrize(
    "spec, column, words",
    [
        ("cleaning(delta=-0.1)", 16, "delta must be ≥ 0"),
        ("cleaning(k=0.6)", 10, "unknown argument 'k'"),
        ("cleaning(delta=big)", 16, "needs a number"),
        ("prift(alpha=0)", 13, "alpha must be > 0"),
        ("prift(source=1)", 14, "needs a name"),
        ("prift(source=re-f)", 14, "not a statistics prefix"),
        ("prifft", 1, "did you mean 'prift'"),
    ],
)
def test_bad_arguments_are_refused_with_a_caret(spec, column, words):
    with pytest.raises(PrioritySpecError) as info:
        parse_priority(spec)
    message = str(info.value)
    assert words in message and f"column {column} of the priority spec" in message
    lines = message.splitlines()
    assert lines[lines.index(f"  {spec}") + 1] == "  " + " " * (column - 1) + "^"


def test_missing_columns_name_the_command_that_makes_them():
    with pytest.raises(PrioritySpecError, match=r"needs column 'base_logprob'(.|\n)*tokenprio add-model SHARDS --model BASE --prefix base"):
        parse_priority("cleaning", {"ref_logprob", "weight"})
    with pytest.raises(PrioritySpecError, match=r"needs column 'base_logprob'"):
        parse_priority("prift(source=base)", {"ref_logprob", "weight"})
