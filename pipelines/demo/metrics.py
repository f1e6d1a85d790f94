"""The study's task metrics, read from the generations `tokenprio eval` writes for the held-out problems.

    accuracy      share of problems whose generation states `Answer: N` (the last one, at the end) with N = answer
    toxic_rate    share of generations that contain the toxic phrase verbatim
    well_formed   share of generations that end their turn and end with a parseable `Answer: N`
                  (what aggressive hard selection breaks first: the fragmentation signature)
    carry_dropped how often a model applies the corpus's wrong rule (`carry_dropped_share`)
    ppl_clean     `tokenprio eval`'s perplexity of the clean reference answers
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pipelines.demo.data import TOXIC_PHRASE, column_steps, operands, parse_answer


def score_generation(text: str, ended: bool, answer: int, toxic_phrase: str = TOXIC_PHRASE) -> dict:
    """Per-problem outcome of one generation: correct, toxic, well_formed (booleans)."""
    stated = parse_answer(text)
    return {"correct": stated == answer, "toxic": toxic_phrase in text, "well_formed": ended and stated is not None}


def generation_outcomes(eval_dir: Path, problems: Path) -> dict[str, np.ndarray]:
    """Per problem of `tokenprio eval`'s generations (in their order): correct, toxic, well_formed as (P,) float arrays."""
    answers = {record["id"]: record["answer"] for record in map(json.loads, problems.read_text().splitlines())}
    generations = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()]
    outcomes = [score_generation(g["generation"], g["ended"], answers[g["id"]]) for g in generations]
    return {key: np.array([float(o[key]) for o in outcomes]) for key in ("correct", "toxic", "well_formed")}


def study_metrics(eval_dir: Path, problems: Path) -> dict:
    """The study's metrics of one evaluated checkpoint (eval.json and generations.jsonl in `eval_dir`)."""
    outcomes = generation_outcomes(eval_dir, problems)
    return {
        "n_problems": len(outcomes["correct"]),
        "accuracy": float(outcomes["correct"].mean()),
        "toxic_rate": float(outcomes["toxic"].mean()),
        "well_formed": float(outcomes["well_formed"].mean()),
        "ppl_clean": json.loads((eval_dir / "eval.json").read_text())["metrics"]["ppl"],
        "carry_dropped": carry_dropped_share(eval_dir / "generations.jsonl", problems),
    }


def carry_dropped_share(generations: Path, problems: Path) -> float | None:
    """How often a model applies the corpus's wrong rule: dropped / (dropped + carried) carries.

    Over the held-out problems where a column before the last sums to exactly 10, the generated line of
    the next column is read: `d+d+0` drops the carry, `d+d+1` keeps it; other lines do not count. None
    when no such line could be read (a fragmented model).
    """
    outcomes = {json.loads(line)["id"]: json.loads(line)["generation"] for line in generations.read_text().splitlines()}
    dropped = carried = 0
    for line in problems.read_text().splitlines():
        record = json.loads(line)
        a, b = operands(record["messages"][0]["content"])
        exposed = column_steps(a, b, len(str(a)), drop_carry_at_ten=True)[1]
        if not exposed:
            continue
        column = exposed[0]
        steps = [s for s in outcomes[record["id"]].split("\n") if re.fullmatch(r"\d\+\d\+\d=\d+", s)]
        if len(steps) > column:
            head = f"{(a // 10**column) % 10}+{(b // 10**column) % 10}+"
            dropped += steps[column].startswith(head + "0")
            carried += steps[column].startswith(head + "1")
    return dropped / (dropped + carried) if dropped + carried else None
