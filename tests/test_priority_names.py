"""The term names agree in three places: the grammar (SIGNATURES), the evaluator's dispatch (the `match
node.name` cases of scoring/priority/evaluate.py) and the term tables of docs/priority.md.

Run: .venv/bin/pytest -q tests/test_priority_names.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from scoring.priority import ONLINE_TERMS, SCHEDULES, SELECTION_TERMS, SIGNATURES, STUDENT_COLUMNS, parse_priority

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "scoring" / "priority" / "evaluate.py"
DOCS = ROOT / "docs" / "priority.md"
NON_TERMS = {"number", "*"}  # parse-tree nodes that are not names of the grammar: a literal and a product
NAME = r"[A-Za-z_][A-Za-z0-9_-]*"


def dispatched_names() -> list[str]:
    """The string cases of every `match node.name:` in evaluate.py, in source order (duplicates kept)."""
    names = []
    for node in ast.walk(ast.parse(EVALUATE.read_text(), filename=str(EVALUATE))):
        if isinstance(node, ast.Match) and ast.unparse(node.subject) == "node.name":
            for case in node.cases:
                for pattern in ast.walk(case.pattern):
                    if isinstance(pattern, ast.MatchValue) and isinstance(pattern.value, ast.Constant):
                        names.append(pattern.value.value)
    return names


def documented_terms() -> dict[str, list[str]]:
    """Name → the forms documented for it: the backticked first cells of the tables under "## Terms".

    A row documents a name when its first cell holds a code span that is NAME or NAME(...), e.g.
    `highpass(min_nll=0.3, source=ref)` or `dft`; rows like `a * b * …` or `0.5` document no name.
    """
    text = DOCS.read_text()
    section = re.search(r"^## Terms\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section, "docs/priority.md has no '## Terms' section"
    found: dict[str, list[str]] = {}
    for line in section.group(1).splitlines():
        if not line.startswith("|"):
            continue
        first_cell = line.strip("|").split("|")[0]
        for code in re.findall(r"`([^`]+)`", first_cell):
            match = re.fullmatch(rf"({NAME})(\(.*\))?", code.strip())
            if match:
                found.setdefault(match.group(1), []).append(code.strip())
    return found


def test_evaluator_dispatches_exactly_the_grammar_names():
    names = dispatched_names()
    assert names, "no `match node.name:` cases found in scoring/priority/evaluate.py"
    assert len(names) == len(set(names)), f"duplicate cases: {sorted(n for n in set(names) if names.count(n) > 1)}"
    assert set(names) - NON_TERMS == set(SIGNATURES)
    assert NON_TERMS <= set(names)


def test_docs_document_exactly_the_grammar_names():
    documented = documented_terms()
    missing = sorted(set(SIGNATURES) - set(documented))
    unknown = sorted(set(documented) - set(SIGNATURES))
    assert not missing, f"terms of the grammar without an entry in docs/priority.md: {missing}"
    assert not unknown, f"docs/priority.md documents names the grammar lacks: {unknown}"
    assert all(len(forms) == 1 for forms in documented.values()), {n: f for n, f in documented.items() if len(f) > 1}


def test_documented_keyword_names_match_the_signatures():
    """`highpass(min_nll=0.3, source=ref)` names the keyword arguments of highpass, in signature order."""
    for name, forms in documented_terms().items():
        if name == "labels" or name not in SIGNATURES:  # labels(NAME=VALUE, …) takes free keywords; unknown names fail above
            continue
        for form in forms:
            keys = re.findall(rf"({NAME})=", form)
            assert keys == [key for key, _, _ in SIGNATURES[name][1]], f"docs/priority.md: {form}"


def test_term_kind_tuples_name_grammar_terms():
    for group in (ONLINE_TERMS, SELECTION_TERMS, SCHEDULES):
        assert set(group) <= set(SIGNATURES), group
    # every online term reads a student column, and together they read all of them
    read = set()
    for name in ONLINE_TERMS:
        columns = parse_priority(name).student_columns
        assert columns, name
        read |= columns
    assert read == set(STUDENT_COLUMNS)
