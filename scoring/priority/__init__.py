"""The Φ (token priority) library: one spec grammar, evaluated offline from stored columns and online by the trainer.

    grammar.py   the spec grammar: SIGNATURES, Node, Priority, the tokenizer and parser (caret errors),
                 canonical text, static properties, parse_priority, default_normalize
    terms.py     the per-term math, one plain function per term, formulas and sources in docstrings
    evaluate.py  evaluate_priority (product semantics, schedules), resolve_global, check_offline,
                 parse_offline (check_offline plus refusing unresolved global terms)

The names below are the public API; import them from `scoring.priority`. docs/priority.md is the user's guide.
"""

from scoring.priority.evaluate import check_offline, evaluate_priority, parse_offline, resolve_global
from scoring.priority.grammar import (
    ONLINE_TERMS,
    SCHEDULES,
    SELECTION_TERMS,
    SIGNATURES,
    STUDENT_COLUMNS,
    Node,
    Priority,
    PrioritySpecError,
    default_normalize,
    parse_priority,
)

__all__ = [
    "ONLINE_TERMS",
    "SCHEDULES",
    "SELECTION_TERMS",
    "SIGNATURES",
    "STUDENT_COLUMNS",
    "Node",
    "Priority",
    "PrioritySpecError",
    "check_offline",
    "default_normalize",
    "evaluate_priority",
    "parse_offline",
    "parse_priority",
    "resolve_global",
]
