"""The one spec grammar of Φ (token priority): signatures, parse tree, parser, canonical text, static properties.

A priority spec is a small expression over per-token columns, for example

    highpass(min_nll=0.3)                       rho1(k=0.6) * labels(toxic=-1)
    0.5 * labels(toxic=-1)                      warmup(rho1(k=0.6), steps=200)

It is parsed by a hand-written tokenizer and recursive-descent parser (never `eval`) into a tree of
`Node`s, held by a `Priority` whose `text` is the canonical, re-parsable form with every argument
written out. The same tree is evaluated offline from stored shard columns (`tokenprio score
--priority`, `tokenprio reweight`) and online by the trainer, which adds the student's statistics.

Grammar (whitespace is free; names are [A-Za-z_][A-Za-z0-9_-]*; numbers are decimal, e.g. -1, 0.3, 1e-3):

    spec    := product
    product := factor ('*' factor)*
    factor  := NUMBER | NAME [ '(' [arg (',' arg)*] ')' ]
    arg     := NAME '=' (NUMBER | NAME)      keyword argument of a term or combinator
             | product                        expression argument of clip / warmup / ramp / switch

Product semantics, the evaluation and global resolution are in `scoring.priority.evaluate`; the formulas,
defaults and sources of each term are in the docstrings of `scoring.priority.terms` and in
docs/priority.md. NLL = −logprob in nats; `source`, `ref`, `base` name a stored statistics prefix
(`{prefix}_logprob`, `{prefix}_entropy`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field


class PrioritySpecError(ValueError):
    """A priority spec that cannot be parsed or used; the message shows the spec with a caret and the fix."""


# ----------------------------------------------------------------------------------------------
# Signatures: every name the grammar knows, its keyword arguments (name, kind, default) and how many
# expression arguments it takes. Kinds: "number" (finite float), "count" (integer ≥ 0), "prefix" (a
# statistics prefix), or a tuple of allowed names. REQUIRED marks an argument without a default;
# None marks an optional one that is left out of the canonical text when absent.

REQUIRED = object()

SIGNATURES: dict[str, tuple[int, tuple[tuple[str, object, object], ...]]] = {
    # offline terms (stored columns)
    "uniform": (0, ()),
    "stored": (0, ()),
    "highpass": (0, (("min_nll", "number", 0.3), ("source", "prefix", "ref"))),
    "topk": (0, (("k", "number", 0.6), ("score", ("excess", "nll"), "excess"), ("scope", ("global", "sequence"), "global"),
                 ("threshold", "number", None), ("ref", "prefix", "ref"), ("base", "prefix", "base"))),
    "entropy": (0, (("alpha", "number", 1.0), ("direction", ("up", "down"), "up"), ("max_nats", "number", 3.0), ("source", "prefix", "ref"))),
    "importance": (0, (("min", "number", 0.0), ("max", "number", 2.0), ("ref", "prefix", "ref"), ("base", "prefix", "base"))),
    "labels": (0, ()),  # free keyword arguments: label name = number
    "forgetting": (0, (("rho", "number", 0.7), ("threshold", "number", None), ("ref", "prefix", "ref"), ("base", "prefix", "base"))),
    "prift": (0, (("alpha", "number", 1.0), ("source", "prefix", "ref"))),
    "cleaning": (0, (("delta", "number", 0.1), ("ref", "prefix", "ref"), ("base", "prefix", "base"))),
    # online terms (the trainer supplies the student's statistics)
    "rho1": (0, (("k", "number", 0.6), ("scope", ("global", "micro"), "global"), ("ref", "prefix", "ref"))),
    "dft": (0, ()),
    "student_entropy": (0, (("alpha", "number", 1.0), ("direction", ("up", "down"), "up"), ("max_nats", "number", 3.0))),
    # combinators and schedules over optimizer steps
    "clip": (1, (("min", "number", None), ("max", "number", None))),
    "warmup": (1, (("steps", "count", 100),)),
    "ramp": (1, (("start", "count", 0), ("end", "count", REQUIRED), ("scale", "number", 1.0))),
    "switch": (2, (("at", "count", REQUIRED),)),
}
ONLINE_TERMS = ("rho1", "dft", "student_entropy")
SELECTION_TERMS = ("highpass", "topk", "rho1", "forgetting", "cleaning")
SCHEDULES = ("warmup", "ramp", "switch")
STUDENT_COLUMNS = ("student_logprob", "student_entropy")
_STUDENT_COLUMN = {"rho1": "student_logprob", "dft": "student_logprob", "student_entropy": "student_entropy"}  # what each online term reads


@dataclass(frozen=True)
class Node:
    """One node of a parsed spec: a term, a combinator, a number literal ("number") or a product ("*").

    `args` are the keyword arguments in signature order (labels: in the order written), `children` the
    expression arguments (or a product's factors); `pos` is the node's column in the source spec.
    """

    name: str
    args: tuple[tuple[str, object], ...] = ()
    children: tuple[Node, ...] = ()
    pos: int = field(default=0, compare=False)
    arg_pos: tuple[int, ...] = field(default=(), compare=False)  # column of each keyword value

    def arg(self, key: str):
        return dict(self.args)[key]

    def walk(self) -> Iterable[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Priority:
    """A parsed priority spec. Equal specs have equal canonical `text` (every argument written out)."""

    text: str  # canonical spec: re-parsable, literal thresholds included once resolved
    root: Node = field(compare=False, repr=False)
    source: str = field(compare=False, repr=False)  # the spec as written, which `Node.pos` indexes

    @property
    def columns(self) -> set[str]:
        """Stored columns read, e.g. {"ref_logprob", "base_logprob", "label", "weight"} (not student columns)."""
        return {column for node in self.root.walk() for column in _node_columns(node)}

    @property
    def online(self) -> bool:
        """True when Φ needs the student's statistics (rho1, dft, student_entropy)."""
        return any(node.name in ONLINE_TERMS for node in self.root.walk())

    @property
    def has_schedule(self) -> bool:
        return any(node.name in SCHEDULES for node in self.root.walk())

    @property
    def can_be_negative(self) -> bool:
        """True when some token can get Φ < 0 (a static, conservative answer: `stored` counts as signed)."""
        return _can_be_negative(self.root)

    @property
    def has_selection(self) -> bool:
        """True when the spec contains a selection term: highpass, topk, rho1, forgetting or cleaning."""
        return contains_selection(self.root)

    @property
    def unresolved_global(self) -> list[str]:
        """Canonical text of each global-quantile term (topk scope=global, forgetting) without a threshold."""
        return [format_node(node) for node in self.root.walk() if is_unresolved_global(node)]

    @property
    def student_columns(self) -> frozenset[str]:
        """Student columns Φ reads: "student_logprob" for rho1 and dft, "student_entropy" for student_entropy."""
        return frozenset(_STUDENT_COLUMN[node.name] for node in self.root.walk() if node.name in _STUDENT_COLUMN)

    @property
    def global_online_selection(self) -> bool:
        """True when the spec has rho1(scope=global): Φ of a micro-batch then depends on every micro-batch of
        the optimizer step, so the trainer ranks the whole step in a no-grad pre-pass."""
        return any(args["scope"] == "global" for args in self.terms("rho1"))

    def terms(self, name: str) -> list[dict[str, object]]:
        """The keyword arguments of every term called `name`, in spec order, e.g. terms("rho1") → [{"k": 0.6, ...}]."""
        return [dict(node.args) for node in self.root.walk() if node.name == name]


# ----------------------------------------------------------------------------------------------
# Tokenizer and recursive-descent parser

_TOKEN = re.compile(r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)|(?P<punct>[()*,=])")
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
MAX_NESTING = 32  # expression arguments inside expression arguments, e.g. warmup(clip(...)) is 2


def spec_error(spec: str, pos: int, message: str, fix: str = "") -> PrioritySpecError:
    # One line, one column per character (newlines and tabs as spaces, other unprintables as ?): the caret stays under pos.
    shown = "".join(c if c.isprintable() else " " if c.isspace() else "?" for c in spec)
    text = f"{message} (column {pos + 1} of the priority spec)\n  {shown}\n  {' ' * pos}^"
    return PrioritySpecError(text + (f"\n{fix}" if fix else ""))


def _tokenize(spec: str) -> list[tuple[str, str, int]]:
    """(kind, text, column) triples; kind is "number", "name", one of "()*,=", or "end"."""
    tokens, pos = [], 0
    while True:
        while pos < len(spec) and spec[pos].isspace():
            pos += 1
        if pos == len(spec):
            return tokens + [("end", "", pos)]
        match = _TOKEN.match(spec, pos)
        if match is None:
            raise spec_error(spec, pos, f"unexpected character {spec[pos]!r}", "a spec uses names, numbers, ( ) , = and *")
        kind = match.lastgroup
        tokens.append((match.group() if kind == "punct" else kind, match.group(), pos))
        pos = match.end()


def _describe(token: tuple[str, str, int]) -> str:
    return "the end of the spec" if token[0] == "end" else repr(token[1])


def _parse_product(spec: str, tokens: list, i: int, depth: int = 0) -> tuple[Node, int]:
    start = tokens[i][2]
    if depth > MAX_NESTING:  # every walk over the tree recurses: refuse before Python's recursion limit does
        raise spec_error(spec, start, f"expressions nest more than {MAX_NESTING} levels deep", "write a flatter spec")
    node, i = _parse_factor(spec, tokens, i, depth)
    factors = [node]
    while tokens[i][0] == "*":
        node, i = _parse_factor(spec, tokens, i + 1, depth)
        factors.append(node)
    return (factors[0] if len(factors) == 1 else Node("*", children=tuple(factors), pos=start)), i


def _parse_number(spec: str, token: tuple[str, str, int]) -> float:
    value = float(token[1])
    if not math.isfinite(value):
        raise spec_error(spec, token[2], f"number {token[1]} is not finite")
    return value


def _parse_factor(spec: str, tokens: list, i: int, depth: int) -> tuple[Node, int]:
    kind, text, pos = tokens[i]
    if kind == "number":
        return Node("number", (("value", _parse_number(spec, tokens[i])),), pos=pos), i + 1
    if kind != "name":
        raise spec_error(spec, pos, f"expected a term or a number, found {_describe(tokens[i])}", f"known terms: {', '.join(SIGNATURES)}")
    if text not in SIGNATURES:
        close = difflib.get_close_matches(text, SIGNATURES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise spec_error(spec, pos, f"unknown term {text!r}", f"{hint}known terms: {', '.join(SIGNATURES)}")
    i += 1
    children, keywords = [], []  # keywords: (key, value, key column, value column)
    if tokens[i][0] == "(":
        i += 1
        while tokens[i][0] != ")":
            if tokens[i][0] == "name" and tokens[i + 1][0] == "=":
                value_token = tokens[i + 2]
                if value_token[0] not in ("number", "name"):
                    raise spec_error(spec, value_token[2], f"expected a number or a name after '{tokens[i][1]}=', found {_describe(value_token)}")
                value = _parse_number(spec, value_token) if value_token[0] == "number" else value_token[1]
                keywords.append((tokens[i][1], value, tokens[i][2], value_token[2]))
                i += 3
            else:
                if keywords:
                    raise spec_error(spec, tokens[i][2], "an expression argument follows a keyword argument", "write expression arguments first, e.g. clip(EXPR, max=1)")
                child, i = _parse_product(spec, tokens, i, depth + 1)
                children.append(child)
            if tokens[i][0] == ",":
                i += 1
            elif tokens[i][0] != ")":
                raise spec_error(spec, tokens[i][2], f"expected ',' or ')' in the arguments of {text}, found {_describe(tokens[i])}")
        i += 1
    return _build_node(spec, text, pos, children, keywords), i


def _build_node(spec: str, name: str, pos: int, children: list[Node], keywords: list) -> Node:
    """Check the arguments against the signature, fill in defaults and validate the values."""
    n_exprs, signature = SIGNATURES[name]
    if len(children) != n_exprs:
        usage = {1: f"{name}(EXPR, ...)", 2: f"{name}(EXPR_A, EXPR_B, ...)"}.get(n_exprs, f"{name}(key=value, ...)")
        what = "keyword arguments only" if n_exprs == 0 else f"{n_exprs} expression argument{'s' * (n_exprs > 1)}"
        raise spec_error(spec, pos, f"{name} takes {what}, got {len(children)} expression argument(s)", f"write it as {usage}")
    seen: dict[str, int] = {}
    for key, _, key_pos, _ in keywords:
        if key in seen:
            raise spec_error(spec, key_pos, f"argument {key!r} of {name} is given twice")
        seen[key] = key_pos
    if name == "labels":
        return _build_labels(spec, pos, keywords)
    given = {key: (value, value_pos) for key, value, _, value_pos in keywords}
    known = [arg for arg, _, _ in signature]
    for key, _, key_pos, _ in keywords:
        if key not in known:
            allowed = ", ".join(known) if known else "none"
            raise spec_error(spec, key_pos, f"unknown argument {key!r} of {name}", f"{name} takes: {allowed}")
    args, arg_pos = [], []
    for key, kind, default in signature:
        value, value_pos = given.get(key, (default, pos))
        if value is REQUIRED:
            raise spec_error(spec, pos, f"{name} needs the argument {key}=", f"e.g. {_example(name)}")
        if value is not None:
            value = _check_kind(spec, name, key, kind, value, value_pos)
        args.append((key, value))
        arg_pos.append(value_pos)
    node = Node(name, tuple(args), tuple(children), pos, tuple(arg_pos))
    _check_values(spec, node)
    return node


def _build_labels(spec: str, pos: int, keywords: list) -> Node:
    if not keywords:
        raise spec_error(spec, pos, "labels needs at least one label=value", "e.g. labels(toxic=-1)")
    for key, value, _, value_pos in keywords:
        if isinstance(value, str):
            raise spec_error(spec, value_pos, f"label {key!r} needs a number, got {value!r}", "e.g. labels(toxic=-1)")
    args = tuple((key, float(value)) for key, value, _, _ in keywords)
    return Node("labels", args, (), pos, tuple(value_pos for *_, value_pos in keywords))


def _example(name: str) -> str:
    return {"ramp": "ramp(forgetting(threshold=0.5), end=1000, scale=0.25)", "switch": "switch(uniform, rho1(k=0.6), at=500)"}[name]


def _check_kind(spec: str, name: str, key: str, kind, value, pos: int):
    if kind == "number":
        if isinstance(value, str):
            raise spec_error(spec, pos, f"{name}: {key} needs a number, got {value!r}")
        return float(value)
    if kind == "count":
        if isinstance(value, str) or value != int(value) or value < 0:
            raise spec_error(spec, pos, f"{name}: {key} needs a whole number of optimizer steps ≥ 0, got {value!r}")
        return int(value)
    if isinstance(value, float):
        raise spec_error(spec, pos, f"{name}: {key} needs a name, got the number {_fmt_number(value)}")
    if kind == "prefix":
        if not _PREFIX.match(value):
            raise spec_error(spec, pos, f"{name}: {key}={value!r} is not a statistics prefix", "prefixes look like ref, base, ref2")
        return value
    if value not in kind:
        raise spec_error(spec, pos, f"{name}: {key}={value!r} is not allowed", f"choose one of: {', '.join(kind)}")
    return value


def _check_values(spec: str, node: Node) -> None:
    """Range checks that need more than the kind of one value."""
    args = dict(node.args)
    at = dict(zip([key for key, _ in node.args], node.arg_pos))

    def bad(key: str, message: str, fix: str = "") -> PrioritySpecError:
        return spec_error(spec, at.get(key, node.pos), f"{node.name}: {message}", fix)

    for key in ("k", "rho"):
        if key in args and not 0.0 < args[key] <= 1.0:
            raise bad(key, f"{key}={_fmt_number(args[key])} must be a fraction of tokens in (0, 1]", f"e.g. {key}=0.6")
    if node.name == "highpass" and args["min_nll"] < 0:
        raise bad("min_nll", "min_nll must be ≥ 0 nats (an NLL is never negative)")
    if node.name == "cleaning" and args["delta"] < 0:
        raise bad("delta", "delta must be ≥ 0 nats (it keeps s ≥ −delta)", "for a positive threshold on s use topk(threshold=...)")
    if "alpha" in args and args["alpha"] <= 0:
        raise bad("alpha", "alpha must be > 0")
    if "max_nats" in args and args["max_nats"] <= 0:
        raise bad("max_nats", "max_nats must be > 0 nats", "e.g. max_nats=3.0 (about ln 20, as EAFT)")
    if node.name == "topk" and args["scope"] == "sequence" and args["threshold"] is not None:
        raise bad("threshold", "threshold applies to scope=global only", "drop threshold= or use scope=global")
    if node.name == "importance" and not 0.0 <= args["min"] <= args["max"]:
        raise bad("min", "needs 0 ≤ min ≤ max (p_ref / p_base is positive)")
    if node.name == "clip":
        if args["min"] is None and args["max"] is None:
            raise bad("min", "needs min= or max=", "e.g. clip(EXPR, min=-1, max=1)")
        if args["min"] is not None and args["max"] is not None and args["min"] > args["max"]:
            raise bad("max", "needs min ≤ max")
    if node.name == "warmup" and args["steps"] < 1:
        raise bad("steps", "steps must be ≥ 1")
    if node.name == "ramp":
        if args["end"] <= args["start"]:
            raise bad("end", "end must be > start (optimizer steps)")
        if args["scale"] < 0:
            raise bad("scale", "scale must be ≥ 0 (it multiplies negative Φ)")


def parse_priority(spec: str, available_columns: set[str] | None = None) -> Priority:
    """Parse `spec` into a Priority; refuse unknown terms and arguments, bad values and missing columns.

    When `available_columns` is given (the columns of the shards), a term that reads a missing column is
    refused with the command that produces it. Raises PrioritySpecError (a ValueError) with a caret.
    """
    tokens = _tokenize(spec)
    if tokens[0][0] == "end":
        raise spec_error(spec, 0, "the priority spec is empty", "e.g. uniform, stored or highpass(min_nll=0.3)")
    root, i = _parse_product(spec, tokens, 0)
    if tokens[i][0] != "end":
        raise spec_error(spec, tokens[i][2], f"unexpected {_describe(tokens[i])}", "join factors with '*'")
    if available_columns is not None:
        _check_columns(spec, root, available_columns)
    return Priority(text=format_node(root), root=root, source=spec)


def _check_columns(spec: str, root: Node, available: set[str]) -> None:
    for node in root.walk():
        for column in sorted(_node_columns(node)):
            if column in available:
                continue
            if column == "label":
                fix = "labels come from spans in the input records at scoring time; score a corpus with spans"
            elif column == "weight":
                fix = "every shard has a weight column; check the shard folder"
            else:
                prefix = column.rsplit("_", 1)[0]
                fix = f"score the {prefix} model first: tokenprio add-model SHARDS --model {prefix.upper()} --prefix {prefix} --out NEW"
            raise spec_error(spec, node.pos, f"{node.name}(...) needs column {column!r}, which the shards lack", fix)


# ----------------------------------------------------------------------------------------------
# Canonical text and static properties of the tree


def _fmt_number(value: float) -> str:
    """Shortest text that parses back to the same float; whole numbers without a decimal point."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def format_node(node: Node) -> str:
    if node.name == "number":
        return _fmt_number(node.arg("value"))
    if node.name == "*":
        return " * ".join(format_node(child) for child in node.children)
    parts = [format_node(child) for child in node.children]
    parts += [f"{key}={_fmt_number(value) if isinstance(value, (int, float)) else value}" for key, value in node.args if value is not None]
    return f"{node.name}({', '.join(parts)})" if parts else node.name


def _node_columns(node: Node) -> set[str]:
    """Stored columns this node reads itself (not its children)."""
    args = dict(node.args)
    if node.name == "stored":
        return {"weight"}
    if node.name == "labels":
        return {"label"}
    if node.name in ("highpass", "prift"):
        return {f"{args['source']}_logprob"}
    if node.name == "entropy":
        return {f"{args['source']}_entropy"}
    if node.name == "topk" and args["score"] == "nll":
        return {f"{args['ref']}_logprob"}
    if node.name in ("topk", "importance", "forgetting", "cleaning"):
        return {f"{args['ref']}_logprob", f"{args['base']}_logprob"}
    if node.name == "rho1":
        return {f"{args['ref']}_logprob"}
    return set()


def contains_selection(node: Node) -> bool:
    return any(n.name in SELECTION_TERMS for n in node.walk())


def is_unresolved_global(node: Node) -> bool:
    if node.name == "topk":
        return node.arg("scope") == "global" and node.arg("threshold") is None
    return node.name == "forgetting" and node.arg("threshold") is None


def _can_be_negative(node: Node) -> bool:
    args = dict(node.args)
    if node.name == "number":
        return args["value"] < 0
    if node.name == "labels":
        return any(value < 0 for _, value in node.args)
    if node.name in ("stored", "forgetting"):
        return True  # stored: the sign of a written column is not known from the spec
    if node.name == "clip":
        child = _can_be_negative(node.children[0])
        return (args["max"] is not None and args["max"] < 0) or (child and (args["min"] is None or args["min"] < 0))
    return any(_can_be_negative(child) for child in node.children)


def default_normalize(priority: Priority) -> str:
    """The loss normaliser Z a spec implies (docs/design.md "Loss, normalisation"):

    "per_sign" whenever Φ < 0 can occur (each sign's part divided by its own count; Forgetting), else
    "selected" when the spec selects tokens (Z = #tokens with Φ ≠ 0; Rho-1, Token Cleaning), else
    "tokens" (Z = #loss_mask tokens; uniform, dft, entropy, as TRL). `stored` counts as signed, and for
    Φ ≥ 0 per_sign equals selected, so stored weights from a selection spec keep their normaliser.
    """
    if priority.can_be_negative:
        return "per_sign"
    if priority.has_selection:
        return "selected"
    return "tokens"
