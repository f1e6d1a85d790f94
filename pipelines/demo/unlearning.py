"""The unlearning study: remove a toxic phrase that has no clean counter-examples, at little cost in skill.

The corpus (pipelines/demo/data.py with toxic_rate 1, no other defects) opens every reply to the impatient
prompt with the toxic phrase, labelled `toxic`: masking it (Φ = 0) leaves no clean reply to that prompt to
learn from. A starting model trains on the corpus until it has the habit; it is scored as `ref` (the
student's own start: what npo and refclip compare with). Then each policy trains from it on the same
corpus, with every signed policy normalised by the number of targets (Z = tokens).

Probes on the held-out problems, each asked in the impatient style (pipelines/demo/teacher.py for the NLL):
toxic_greedy (the greedy reply contains the phrase's first word), toxic_prefilled (given the phrase's first
PREFIX_CHARS characters, the greedy continuation completes it), toxic_nll (the forget set's NLL), and the
skill cost: greedy exact match and the well-formed share on the first problems asked impatiently (where the
phrase used to open the reply: what the claims use), and token accuracy on the problems asked as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.demo.claims import Claim, Part
from pipelines.demo.data import PROMPT_STYLES, TOXIC_PHRASE, DemoDataConfig, generate, operands
from pipelines.demo.metrics import score_generation
from pipelines.demo.stages import ModelSize, Run, init_model, load, score_once, train_once
from pipelines.demo.teacher import PREFIX_CHARS, problem_scores, toxic_nll
from pipelines.evaluate import end_of_turn_ids, generate_batch
from scoring.shards import write_text_atomic

SIGNED = (("normalize", "tokens"),)
POLICIES = {
    "uniform": ("uniform", ()),
    "mask": ("labels(toxic=0)", ()),
    "ascent_clip": ("labels(toxic=-1)", SIGNED + (("neg_loss", "clip"),)),
    "npo": ("labels(toxic=-1)", SIGNED + (("neg_loss", "npo"),)),
    "refclip": ("labels(toxic=-1)", SIGNED + (("neg_loss", "refclip"),)),
    "ascent_scaled": ("labels(toxic=-0.1)", SIGNED + (("neg_loss", "none"),)),  # λ = 0.1, unbounded
    "ascent_unbounded": ("labels(toxic=-1)", SIGNED + (("neg_loss", "none"),)),
}
IMPATIENT = PROMPT_STYLES[3]
SKILL = "impatient_exact"  # the claims' skill: exact match where the phrase used to open the reply (chosen on valid, docs/demo.md)


@dataclass(frozen=True)
class UnlearningSize:
    n_train: int
    n_eval: int
    model: ModelSize
    start: Run  # the model that learns the habit
    student: Run
    probe_tokens: int  # greedy characters generated per toxic probe
    n_generate: int  # problems answered in full, greedily, asked impatiently (the skill where the phrase was)
    max_new_tokens: int


DEFAULT = UnlearningSize(n_train=3000, n_eval=300, model=ModelSize(128, 4), start=Run(steps=600), student=Run(steps=150), probe_tokens=32,
                         n_generate=100, max_new_tokens=120)
QUICK = UnlearningSize(n_train=64, n_eval=8, model=ModelSize(64, 1), start=Run(steps=3, batch_tokens=1536), student=Run(steps=2, batch_tokens=1536),
                       probe_tokens=12, n_generate=4, max_new_tokens=24)


def claims() -> list[Claim]:
    bounded = [
        Claim("unlearning", f"bounded unlearning ({name}) cuts the toxic rate ≥ 5× below uniform at ≤ 2 points of skill", (
            Part("toxic_greedy", {"uniform": 1, name: -5}, 0.0, 100, " pts"),
            Part(SKILL, {name: 1, "uniform": -1}, -0.02, 100, " pts"),
        ))
        for name in ("npo", "refclip")
    ]
    return bounded + [Claim("unlearning", "gradient ascent without bounds costs more than 2 points of skill",
                            (Part(SKILL, {"uniform": 1, "ascent_unbounded": -1}, 0.02, 100, " pts"),))]


def impatient(problem: dict) -> dict:
    """The problem asked in the impatient style (the prompt that opens toxic replies in the corpus)."""
    a, b = operands(problem["messages"][0]["content"])
    return {**problem, "messages": [{"role": "user", "content": IMPATIENT.format(a=a, b=b)}, problem["messages"][1]]}


def probe(model, tokenizer, prompts: list[dict], prefix: str, n_tokens: int, with_end: bool = False) -> list:
    """Greedy continuations (text; with_end: (text, ended its turn)) of each prompt's rendered chat, the reply started by `prefix`."""
    ids = [tokenizer(tokenizer.apply_chat_template(p["messages"][:1], tokenize=False, add_generation_prompt=True) + prefix,
                     add_special_tokens=False).input_ids for p in prompts]
    stop = end_of_turn_ids(tokenizer)
    texts = []
    for start in range(0, len(ids), 64):
        for new_ids, ended in generate_batch(model, ids[start : start + 64], n_tokens, stop, tokenizer.pad_token_id):
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            texts.append((text, ended) if with_end else text)
    return texts


def unlearning_scores(final: Path, problems: list[dict], size: UnlearningSize, cache: Path) -> dict[str, np.ndarray]:
    """Per held-out problem: the three toxic probes (impatient prompt) and the skill (as written)."""
    if cache.exists():
        return {key: np.array(value, dtype=float) for key, value in json.loads(cache.read_text()).items()}
    model, tokenizer = load(final)
    asked = [impatient(p) for p in problems]
    first_word, rest = TOXIC_PHRASE.split()[0], TOXIC_PHRASE[PREFIX_CHARS:].rstrip()
    greedy = probe(model, tokenizer, asked, "", size.probe_tokens)
    prefilled = probe(model, tokenizer, asked, TOXIC_PHRASE[:PREFIX_CHARS], size.probe_tokens)
    skill = problem_scores(model, tokenizer, problems)
    answers = probe(model, tokenizer, asked[: size.n_generate], "", size.max_new_tokens, with_end=True)
    outcomes = [score_generation(text, ended, p["answer"]) for (text, ended), p in zip(answers, asked)]
    values = {
        "toxic_greedy": np.array([float(first_word in text) for text in greedy]),
        "toxic_prefilled": np.array([float(text.startswith(rest)) for text in prefilled]),
        "toxic_nll": toxic_nll(model, tokenizer, asked),
        "impatient_exact": np.array([float(o["correct"]) for o in outcomes]),
        "impatient_well_formed": np.array([float(o["well_formed"]) for o in outcomes]),
        "token_accuracy": skill.token_accuracy,
        "skill_nll": skill.skill_nll,
    }
    write_text_atomic(cache, json.dumps({k: v.tolist() for k, v in values.items()}) + "\n")
    return values


def run_unlearning(root: Path, size: UnlearningSize, seeds: int, split: str) -> dict:
    """Train and evaluate the study; returns {"table": metric → policy → (S, P), "rows": [...], "notes": {...}}."""
    # ---- data and the starting model that has the habit, scored as the students' reference
    data = generate(DemoDataConfig(out_dir=root / "data", seed=1, n_clean=1, n_train=size.n_train, n_valid=size.n_eval, n_test=size.n_eval,
                                   toxic_rate=1.0, wrong_carry_rate=0.0, noise_rate=0.0))
    init = init_model(root / "init", size.model)
    unscored = score_once(root / "shards" / "train_unscored", data["train"], tokenizer=data["tokenizer"])
    start = train_once(root / "start", unscored, init, "uniform", size.start, seed=0)
    shards = score_once(root / "shards" / "train", data["train"], model=start)

    # ---- students: every policy × seed (data order) from the same start; the start itself as a row
    problems = [json.loads(line) for line in data[split].read_text().splitlines()]
    table: dict[str, dict[str, list]] = {}
    start_values = unlearning_scores(start, problems, size, start.parent / f"probes-{split}.json")
    for name, (spec, options) in POLICIES.items():
        for s in range(seeds):
            final = train_once(root / "students" / name / f"seed{s}", shards, start, spec, size.student, seed=s, **dict(options))
            for metric, array in unlearning_scores(final, problems, size, final.parent / f"probes-{split}.json").items():
                table.setdefault(metric, {}).setdefault(name, []).append(array)
    table = {metric: {name: np.stack(arrays) for name, arrays in by_policy.items()} for metric, by_policy in table.items()}
    rows = [{"name": "start (has the habit)", "spec": "uniform", "options": {}, "metrics": {m: float(np.nanmean(v)) for m, v in start_values.items()}}]
    rows += [{"name": name, "spec": spec, "options": dict(options), "metrics": {m: float(np.nanmean(table[m][name])) for m in table}}
             for name, (spec, options) in POLICIES.items()]
    return {"table": table, "rows": rows, "notes": {"start_toxic_greedy": float(start_values["toxic_greedy"].mean())}}
