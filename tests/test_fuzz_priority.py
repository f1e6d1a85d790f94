"""Fuzzing the priority spec grammar with hypothesis (issue 14, item 4).

Every string is either refused with a PrioritySpecError whose message shows the spec on one line and a caret
under a column of it, or parsed into a spec whose canonical text parses back to the same tree and is a
fixed point (text → parse → text). No other exception type, ever. Strategies: arbitrary Unicode strings
(surrogates, controls, newlines included), token soups built from the grammar's own names, numbers and
punctuation, valid specs generated from SIGNATURES (which must parse), and those specs mutated token by token.
Example counts are fixed and the search is derandomized, so CI runs the same examples every time.

Run: .venv/bin/pytest -q tests/test_fuzz_priority.py
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scoring.priority import ONLINE_TERMS, SIGNATURES, PrioritySpecError, default_normalize, evaluate_priority, parse_priority, resolve_global
from scoring.priority.grammar import MAX_NESTING, REQUIRED

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
COLUMNS = {"ref_logprob", "ref_entropy", "base_logprob", "weight", "label"}  # a scored corpus with base and spans
CARET = re.compile(r"^  ( *)\^$")


def check(spec: str, available: set[str] | None = None) -> str | None:
    """The fuzz property; returns the canonical text, or None when the spec was refused (correctly)."""
    try:
        priority = parse_priority(spec, available)
    except PrioritySpecError as error:
        # message (column N of the priority spec) / the spec on one line / the caret under column N / the fix
        lines = str(error).splitlines()
        assert len(lines) >= 3 and CARET.match(lines[2]), f"no caret line under the spec in {str(error)!r}"
        column = int(re.search(r"\(column (\d+) of the priority spec\)$", lines[0]).group(1))
        assert lines[1] == "  " + "".join(c if c.isprintable() else "?" if not c.isspace() else " " for c in spec)
        assert len(CARET.match(lines[2]).group(1)) == column - 1 <= len(spec), str(error)
        return None
    text = priority.text
    again = parse_priority(text, available)
    assert again.text == text, (spec, text, again.text)
    assert again.root == priority.root and again == priority
    assert parse_priority(again.text).text == text  # a fixed point
    # the static properties of any parsed spec evaluate without raising
    assert isinstance(priority.columns, set) and isinstance(priority.can_be_negative, bool)
    assert default_normalize(priority) in ("tokens", "selected", "per_sign")
    assert priority.online == any(priority.terms(name) for name in ONLINE_TERMS)
    return text


# ----------------------------------------------------------------------------------------------
# Strategies

ANY_CHARACTER = st.characters(codec=None, exclude_categories=())  # every code point, lone surrogates included
KEYWORDS = sorted({key for _, signature in SIGNATURES.values() for key, _, _ in signature})
CHOICES = sorted({value for _, signature in SIGNATURES.values() for _, kind, _ in signature if isinstance(kind, tuple) for value in kind})
NUMBERS = st.one_of(
    st.sampled_from(["0", "-0", "1", "-1", "0.5", ".5", "5.", "1e-3", "1E+3", "+2", "1e999", "-1e999", "1e-400", "9" * 40, "0x10", "1e", "--1", "1.2.3", "١٢"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False).map(repr),
)
NAMES = st.one_of(st.sampled_from([*SIGNATURES, *KEYWORDS, *CHOICES, "ref", "base", "ref2", "toxic", "a-b", "_", "Uniform"]), st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,8}", fullmatch=True))
PUNCTUATION = st.sampled_from(["(", ")", ",", "=", "*", "(", ")", " ", "\t", "\n", "$", "", "**", "()", ")(", "=="])
SOUP = st.lists(st.one_of(NAMES, NUMBERS, PUNCTUATION), max_size=30).map(lambda parts: "".join(p + " " * (i % 2) for i, p in enumerate(parts)))


def number_text(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


@st.composite
def keyword_value(draw, name: str, key: str, kind) -> str:
    """A value the signature accepts for `key` (ranges from grammar._check_values)."""
    if kind == "count":
        return str(draw(st.integers(0, 10**6)))
    if kind == "prefix":
        return draw(st.sampled_from(["ref", "base", "ref2", "_p", "Base_1"]))
    if isinstance(kind, tuple):
        return draw(st.sampled_from(kind))
    if key in ("k", "rho"):
        value = draw(st.floats(min_value=1e-9, max_value=1.0))
    elif key in ("alpha", "max_nats"):
        value = draw(st.floats(min_value=1e-9, max_value=1e6))
    elif key in ("min_nll", "delta", "scale", "min"):
        value = draw(st.floats(min_value=0.0, max_value=1e6))
    else:
        value = draw(st.floats(min_value=-1e6, max_value=1e6))
    return number_text(value)


@st.composite
def valid_spec(draw, depth: int = 0) -> str:
    """A spec the grammar must accept: terms with a subset of their arguments in any order, combinators, products."""
    factors = [draw(valid_factor(depth)) for _ in range(draw(st.integers(1, 3)))]
    return " * ".join(factors)


@st.composite
def valid_factor(draw, depth: int) -> str:
    names = [name for name in SIGNATURES if depth < 3 or SIGNATURES[name][0] == 0]
    name = draw(st.sampled_from(["number", *names]))
    if name == "number":
        return number_text(draw(st.floats(-1e6, 1e6)))
    n_exprs, signature = SIGNATURES[name]
    if name == "labels":
        keys = draw(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,6}", fullmatch=True), min_size=1, max_size=3, unique=True))
        return f"labels({', '.join(f'{key}={number_text(draw(st.floats(-4, 4)))}' for key in keys)})"
    args = {}
    for key, kind, default in signature:
        if default is REQUIRED or draw(st.booleans()):
            args[key] = draw(keyword_value(name, key, kind))
    # cross-argument constraints of grammar._check_values
    if name == "topk" and args.get("scope") == "sequence":
        args.pop("threshold", None)
    if name == "importance" and float(args.get("min", 0.0)) > float(args.get("max", 2.0)):
        args["max"] = args.get("min", "0")
    if name == "clip":
        args.setdefault("max", "1")
        if "min" in args and float(args["min"]) > float(args["max"]):
            args["min"], args["max"] = args["max"], args["min"]
    if name == "warmup" and args.get("steps") == "0":
        args["steps"] = "1"
    if name == "ramp" and int(args["end"]) <= int(args.get("start", 0)):
        args["end"] = str(int(args.get("start", 0)) + 1)
    order = draw(st.permutations(list(args)))
    children = [draw(valid_spec(depth + 1)) for _ in range(n_exprs)]
    parts = children + [f"{key}={args[key]}" for key in order]
    return f"{name}({', '.join(parts)})" if parts or draw(st.booleans()) else name


TOKENS = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_-]*|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|.", re.S)


@st.composite
def mutated_spec(draw) -> str:
    """A valid spec with a few of its tokens deleted, duplicated, swapped or replaced by grammar tokens."""
    parts = TOKENS.findall(draw(valid_spec()))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(parts) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert"]))
        if action == "delete" and len(parts) > 1:
            del parts[i]
        elif action == "duplicate":
            parts.insert(i, parts[i])
        elif action == "swap" and i + 1 < len(parts):
            parts[i], parts[i + 1] = parts[i + 1], parts[i]
        elif action in ("replace", "insert"):
            token = draw(st.one_of(NAMES, NUMBERS, PUNCTUATION))
            if action == "replace":
                parts[i] = token
            else:
                parts.insert(i, token)
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# The properties


@FUZZ
@given(st.text(ANY_CHARACTER, max_size=60))
@example("uni\nform")  # found by this suite: a newline in the spec put the caret under the wrong line
@example("uniform\n*\nfoo")
@example("highpass(min_nll=\t-1)")
@example("clip(" * 2000)  # found by this suite: RecursionError instead of a PrioritySpecError
@example("\ud800")
def test_arbitrary_strings_parse_or_are_refused_with_a_caret(spec):
    check(spec)


@FUZZ
@given(SOUP)
def test_token_soups_parse_or_are_refused_with_a_caret(spec):
    check(spec)
    check(spec, COLUMNS)


@FUZZ
@given(valid_spec())
@example("labels(a-b=1e+300) * -0 * 1e-400")
@example("warmup(uniform, steps=100000000000000000000)")
@example("clip(" * MAX_NESTING + "uniform" + ", max=1)" * MAX_NESTING)  # nesting up to the limit parses
def test_generated_valid_specs_parse_and_their_canonical_text_is_a_fixed_point(spec):
    assert check(spec) is not None, spec


def token_columns() -> dict:
    """16 positions, two rows, every stored and student column the grammar can name (prefixes of valid_spec)."""
    generator = torch.Generator().manual_seed(0)
    n = 16
    mask = torch.arange(n) % 8 != 0
    columns = {"loss_mask": mask, "seq_index": torch.arange(n) // 8, "label": torch.randint(-1, 3, (n,), generator=generator)}
    columns["weight"] = torch.where(mask, torch.randn(n, generator=generator), 0.0)
    for prefix in ("ref", "base", "ref2", "_p", "Base_1", "student"):
        columns[f"{prefix}_logprob"] = torch.where(mask, -torch.rand(n, generator=generator) * 30, float("nan"))
        columns[f"{prefix}_entropy"] = torch.where(mask, torch.rand(n, generator=generator) * 8, float("nan"))
    return columns


@FUZZ
@given(valid_spec(), st.integers(0, 10**6))
@example("rho1(k=1.0000000000000003e-09)", 0)  # found by this suite: OverflowError in ceil_fraction
def test_generated_specs_evaluate_to_phi_or_a_named_error(spec, step):
    """Φ is (N,) float32, zero off the loss mask and never NaN, or a ValueError that says why (global terms, NaN)."""
    columns = token_columns()
    try:
        phi = evaluate_priority(parse_priority(spec), columns, step=step, label_names=["toxic", "good", "other"])
    except ValueError as error:
        assert "corpus-wide threshold" in str(error) or "gave NaN" in str(error), str(error)
        return
    assert phi.dtype == torch.float32 and phi.shape == (16,)
    assert not torch.isnan(phi).any() and bool((phi[~columns["loss_mask"]] == 0).all())


@FUZZ
@given(mutated_spec())
def test_mutated_specs_parse_or_are_refused_with_a_caret(spec):
    check(spec)
    check(spec, COLUMNS)


# ----------------------------------------------------------------------------------------------
# The examples that found bugs, as plain tests


def nested(depth: int) -> str:
    return "clip(" * depth + "uniform" + ", max=1)" * depth


def test_deep_nesting_is_a_spec_error_with_a_caret_not_a_recursion_error():
    """Found by the arbitrary-string suite's first explicit example: 2,000 nested clip( raised RecursionError."""
    for depth in (MAX_NESTING + 1, 2000):
        with pytest.raises(PrioritySpecError, match=f"nest more than {MAX_NESTING} levels") as info:
            parse_priority(nested(depth))
        column = 5 * (MAX_NESTING + 1) + 1  # the factor that is one level too deep
        assert f"column {column} of the priority spec" in str(info.value)
        assert str(info.value).splitlines()[2] == "  " + " " * (column - 1) + "^"
    assert parse_priority(nested(MAX_NESTING)).text == nested(MAX_NESTING)


@pytest.mark.parametrize("spec, column", [("uni\nform", 1), ("uniform\n*\nfoo", 11), ("highpass(min_nll=\t-1)", 19), ("uniform\x00", 8)])
def test_a_multiline_spec_is_shown_on_one_line_with_the_caret_under_the_column(spec, column):
    with pytest.raises(PrioritySpecError) as info:
        parse_priority(spec)
    lines = str(info.value).splitlines()
    shown = "".join(" " if c.isspace() else ("?" if not c.isprintable() else c) for c in spec)
    assert lines[1] == "  " + shown and lines[2] == "  " + " " * (column - 1) + "^"
    assert f"column {column} of the priority spec" in lines[0]


def test_a_fraction_with_a_long_decimal_selects_exactly_its_ceiling():
    """Found by the evaluation suite: k = 1.0000000000000003e-09 is 10000000000000003 / 10^25 exactly, and
    ⌈k·n⌉ computed in int64 overflowed (OverflowError) in rho1, topk(scope=sequence) and resolve_global."""
    k = 1.0000000000000003e-09
    columns = token_columns()  # 14 candidates in two rows of 7
    assert int(evaluate_priority(parse_priority(f"rho1(k={k})"), columns).sum()) == 1
    assert int(evaluate_priority(parse_priority(f"topk(k={k}, scope=sequence)"), columns).sum()) == 2  # one per row
    resolved = resolve_global(parse_priority(f"forgetting(rho={k})"), [columns])
    assert int((evaluate_priority(resolved, columns) > 0).sum()) == 1
