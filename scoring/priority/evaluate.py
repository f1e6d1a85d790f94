"""Evaluation of a parsed priority spec: Φ over flat token positions, schedules, and global resolution.

Product semantics (docs/design.md "Φ: one spec syntax"): the factors of a product that contain a selection
term (highpass, topk, rho1, forgetting, cleaning) act only where the product P of the other factors is > 0:

    Φ = P · Π gates    where P > 0
    Φ = P              where P ≤ 0      (a negative token is never deselected)

and every selection term chooses among the candidates {loss_mask and P > 0} only, independently of
the other selection factors of the same product (a token is kept when every selection keeps it).

Dispatch is the `match node.name` of `_evaluate`: one case per name of `grammar.SIGNATURES`, plus
"number" and "*" (tests/test_priority_names.py checks that they agree, and agree with docs/priority.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from scoring.priority.grammar import (
    ONLINE_TERMS,
    SCHEDULES,
    STUDENT_COLUMNS,
    Node,
    Priority,
    PrioritySpecError,
    contains_selection,
    format_node,
    is_unresolved_global,
    parse_priority,
    spec_error,
)
from scoring.priority.terms import (
    ceil_fraction,
    excess,
    term_cleaning,
    term_dft,
    term_entropy,
    term_forgetting,
    term_highpass,
    term_importance,
    term_labels,
    term_prift,
    term_rho1,
    term_student_entropy,
    term_topk,
)


@dataclass(frozen=True)
class _Context:
    tokens: dict[str, torch.Tensor]
    step: int
    label_names: list[str] | None
    collect: dict[int, list[torch.Tensor]] | None = None  # resolve_global: id(node) → candidate scores


def _schedule_fraction(step: int, start: int, end: int) -> float:
    return min(max((step - start) / (end - start), 0.0), 1.0)


def _evaluate(node: Node, cand: torch.Tensor, ctx: _Context) -> torch.Tensor:
    """Φ of `node` as a (N,) float32 tensor; selection terms choose among `cand` (bool (N,))."""
    tokens, args = ctx.tokens, dict(node.args)
    ones = torch.ones(cand.shape, dtype=torch.float32, device=cand.device)
    if is_unresolved_global(node):
        if ctx.collect is None:
            raise PrioritySpecError(
                f"{format_node(node)} needs a corpus-wide threshold; resolve it with `tokenprio reweight SHARDS --priority SPEC "
                "--out NEW` (or pass threshold=)"
            )
        ctx.collect.setdefault(id(node), []).append(excess(tokens, args)[cand].float())
        return ones  # a placeholder: gates of one product do not change each other's candidates
    match node.name:
        case "number":
            return ones * args["value"]
        case "uniform":
            return ones
        case "stored":
            return tokens["weight"].float()
        case "labels":
            return term_labels(tokens, args, ctx.label_names)
        case "*":
            return _evaluate_product(node, cand, ctx)
        case "clip":
            return _evaluate(node.children[0], cand, ctx).clamp(args["min"], args["max"])
        case "warmup":
            # Linear blend from uniform at step 0 to the expression at step `steps`.
            blend = _schedule_fraction(ctx.step, 0, args["steps"])
            return (1.0 - blend) * ones + blend * _evaluate(node.children[0], cand, ctx)
        case "ramp":
            # Negative Φ only, scaled by scale · (step − start)/(end − start) clipped to [0, 1] (Forgetting's λ).
            phi = _evaluate(node.children[0], cand, ctx)
            return torch.where(phi < 0, args["scale"] * _schedule_fraction(ctx.step, args["start"], args["end"]) * phi, phi)
        case "switch":
            return _evaluate(node.children[0] if ctx.step < args["at"] else node.children[1], cand, ctx)
        case "highpass":
            return term_highpass(tokens, args)
        case "topk":
            return term_topk(tokens, args, cand)
        case "entropy":
            return term_entropy(tokens, args)
        case "importance":
            return term_importance(tokens, args)
        case "forgetting":
            return term_forgetting(tokens, args)
        case "prift":
            return term_prift(tokens, args)
        case "cleaning":
            return term_cleaning(tokens, args)
        case "rho1":
            return term_rho1(tokens, args, cand)
        case "dft":
            return term_dft(tokens, args)
        case "student_entropy":
            return term_student_entropy(tokens, args)
    raise AssertionError(f"no evaluation for node {node.name!r}")  # SIGNATURES and this match list the same names


def _evaluate_product(node: Node, cand: torch.Tensor, ctx: _Context) -> torch.Tensor:
    """Φ = P · Π gates where P > 0, else P; P = product of the factors without selection terms."""
    plain = torch.ones(cand.shape, dtype=torch.float32, device=cand.device)
    for child in node.children:
        if not contains_selection(child):
            plain = plain * _evaluate(child, cand, ctx)
    positive = plain > 0
    gated = plain.clone()
    for child in node.children:
        if contains_selection(child):
            gated = gated * _evaluate(child, cand & positive, ctx)
    return torch.where(positive, gated, plain)


def _check_tokens(priority: Priority, tokens: dict[str, torch.Tensor], label_names) -> dict[str, torch.Tensor]:
    """Validate the flat token columns the spec needs; return them as float32 / bool / int64 tensors."""
    if "loss_mask" not in tokens:
        raise ValueError("evaluate_priority: tokens need a 'loss_mask' column (bool, one entry per position)")
    mask = tokens["loss_mask"].bool()
    needed = set(priority.columns) | priority.student_columns
    if any(args["scope"] == "sequence" for args in priority.terms("topk")):
        needed.add("seq_index")
    missing = sorted(needed - set(tokens))
    if missing:
        student = [name for name in missing if name in STUDENT_COLUMNS]
        fix = " (student statistics exist only during training: online terms run in `tokenprio train`)" if student else ""
        raise ValueError(f"priority {priority.text!r} needs token columns {missing}, not given{fix}")
    out = {"loss_mask": mask}
    for name in needed:
        column = tokens[name]
        if column.shape != mask.shape:
            raise ValueError(f"token column {name!r} has shape {tuple(column.shape)}, expected {tuple(mask.shape)} like loss_mask")
        if name in ("label", "seq_index"):
            out[name] = column.long()
            continue
        column = column.float()
        bad = int((torch.isnan(column) & mask).sum())
        if bad:
            raise ValueError(f"token column {name!r} is NaN at {bad} loss_mask position(s); rescore the shards")
        out[name] = column
    if "label" in out:
        if label_names is None:
            raise ValueError(f"priority {priority.text!r} reads labels: pass label_names (the codes' names)")
        if len(out["label"]) and int(out["label"].max()) >= len(label_names):
            raise ValueError(f"label code {int(out['label'].max())} has no name: label_names has {len(label_names)} entries")
    return out


def check_offline(priority: Priority, command: str) -> None:
    """Refuse online terms and schedules where no student exists (`score`, `reweight`, multi-task scoring)."""
    for node in priority.root.walk():
        if node.name in ONLINE_TERMS:
            raise spec_error(
                priority.source,
                node.pos,
                f"{node.name} needs the student model's statistics, which exist only in `tokenprio train`; {command} cannot evaluate it",
                "use it in `tokenprio train --priority SPEC`; offline commands take stored-column terms only",
            )
        if node.name in SCHEDULES:
            raise spec_error(
                priority.source,
                node.pos,
                f"{node.name} changes Φ over optimizer steps, which exist only in `tokenprio train`; {command} cannot evaluate it",
                "use schedules in `tokenprio train --priority SPEC`",
            )


def parse_offline(spec: str, available_columns: set[str], command: str) -> Priority:
    """Parse a spec that `command` (score, reweight) evaluates from stored columns alone: no online terms,
    no schedules, no unresolved global terms (those need `tokenprio reweight`, which resolves them)."""
    priority = parse_priority(spec, available_columns)
    check_offline(priority, command)
    if priority.unresolved_global:
        raise PrioritySpecError(
            f"--priority {spec!r}: {priority.unresolved_global} need a corpus-wide quantile; score with the default "
            "priority, then run `tokenprio reweight SHARDS --priority SPEC --out NEW`, which resolves it."
        )
    return priority


def evaluate_priority(
    priority: Priority, tokens: dict[str, torch.Tensor], *, step: int = 0, label_names: list[str] | None = None
) -> torch.Tensor:
    """Φ over N flat token positions: a (N,) float32 tensor, exactly 0 where loss_mask is false, never NaN.

    tokens: 1-D tensors over the positions of the rows of a batch, concatenated: "loss_mask" (bool),
    "seq_index" (int64 row of each position, for topk scope=sequence), stored columns (float32
    "ref_logprob", "ref_entropy", "weight", ...), "label" (int64 codes into `label_names`, -1 = none),
    and online "student_logprob", "student_entropy" (float32, detached, valid where loss_mask).
    `step` is the optimizer step for schedules. Every top-k breaks ties by position (earlier wins);
    rho1 selects among the positions passed in, so the caller decides its scope.
    Raises ValueError for missing or NaN columns and unresolved global terms.
    """
    columns = _check_tokens(priority, tokens, label_names)
    mask = columns["loss_mask"]
    phi = _evaluate(priority.root, mask, _Context(columns, step, label_names))
    phi = torch.where(mask, phi, torch.zeros_like(phi))
    if torch.isnan(phi).any():
        raise ValueError(f"priority {priority.text!r} gave NaN on {int(torch.isnan(phi).sum())} token(s) (infinite logprobs?)")
    return phi


def resolve_global(
    priority: Priority, batches: Iterable[dict[str, torch.Tensor]], label_names: list[str] | None = None
) -> Priority:
    """Resolve every global-quantile term into a literal threshold, in one pass over `batches`.

    For each unresolved term (topk scope=global with fraction k, forgetting with fraction rho) the
    candidate scores s (loss_mask and the product of the other factors > 0) of all batches are pooled,
    and threshold = the ⌈k·n⌉-th largest s, so `s ≥ threshold` keeps exactly ⌈k·n⌉ of the n candidates
    when no other candidate ties the threshold. Holds 4 bytes per candidate token in memory.
    `label_names` is read per batch (it may grow while batches are produced). Returns the resolved Priority.
    """
    if not priority.unresolved_global:
        return priority
    check_offline(priority, "resolving global terms")
    collect: dict[int, list[torch.Tensor]] = {}
    for tokens in batches:  # the caller wraps them in a progress bar: it knows their number
        columns = _check_tokens(priority, tokens, label_names)
        _evaluate(priority.root, columns["loss_mask"], _Context(columns, 0, label_names, collect))

    def resolved(node: Node) -> Node:
        children = tuple(resolved(child) for child in node.children)
        if not is_unresolved_global(node):
            return replace(node, children=children)
        scores = torch.cat(collect.get(id(node), [torch.zeros(0)])).cpu()  # (n,) float32 nats
        if len(scores) == 0:
            raise ValueError(f"{format_node(node)}: no candidate tokens in the corpus (loss_mask and other factors > 0)")
        fraction = node.arg("k") if node.name == "topk" else node.arg("rho")
        keep = int(ceil_fraction(fraction, torch.tensor(len(scores))))
        threshold = float(torch.kthvalue(scores, len(scores) - keep + 1).values)
        return replace(node, args=tuple((key, threshold if key == "threshold" else value) for key, value in node.args))

    return parse_priority(format_node(resolved(priority.root)))
