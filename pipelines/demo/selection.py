"""The selection study: which Φ policy learns the task best from a noisy corpus, with paired seeds.

Data (pipelines/demo/data.py): a clean set trains the reference (scored as `ref`); the students' noisy
corpus carries three labelled defects (a dropped-carry rule, noise bursts, a toxic phrase) and a
boilerplate sentence; a disjoint noisy pool trains each seed's warm start (the students' initial model,
scored as `base`). Seed s fixes the warm start's initialisation and data order and the student's data
order, so every policy of seed s starts from the same weights and sees the same rows: values are paired.

Each student is checkpointed every `save_every` steps; on the held-out split (pipelines/demo/teacher.py):
token accuracy and NLL on the skill tokens, the carry margin on problems the wrong rule can reach, and
the area under the token-accuracy curve (the mean over checkpoints); greedy exact match and the
well-formed share (fragmentation) of the final checkpoint on the first problems. The primary metric, the
final skill NLL, was chosen on the validation split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.demo.claims import Claim, Part
from pipelines.demo.data import DemoDataConfig, generate
from pipelines.demo.metrics import generation_outcomes
from pipelines.demo.stages import ModelSize, Run, add_model_once, checkpoints, init_model, kept_shares, load, resolved_spec, score_once, train_once
from pipelines.demo.teacher import problem_scores
from pipelines.evaluate import EvalConfig, evaluate
from scoring.shards import write_text_atomic

PRIMARY = "skill_nll"  # nats, lower is better; chosen on the validation split (docs/demo.md), before any test-split run


@dataclass(frozen=True)
class Policy:
    spec: str
    options: tuple[tuple[str, object], ...] = ()  # further TrainConfig fields
    global_terms: bool = False  # resolved over the corpus by reweight before training


POLICIES = {
    "uniform": Policy("uniform"),
    "oracle": Policy("labels(wrong_carry=0, noise=0, toxic=0)", (("normalize", "selected"),)),  # masks every labelled defect
    "rho1": Policy("rho1(k=0.6)"),
    "token_cleaning": Policy("topk(k=0.6)", global_terms=True),  # the paper's forced 60 % share
    "cleaning": Policy("cleaning(delta=0.1)"),  # Token Cleaning by a margin δ instead of a share
    "highpass": Policy("highpass(min_nll=0.3)"),
    "prift": Policy("prift(alpha=1)"),
    "asft": Policy("dft", (("anchor_kl", 0.1),)),  # DFT's weight plus the anchor to the reference
    "dft": Policy("dft"),
    "entropy": Policy("student_entropy(alpha=1)"),
}


@dataclass(frozen=True)
class SelectionSize:
    n_clean: int
    n_train: int
    n_pool: int
    n_eval: int  # problems per held-out split
    n_generate: int  # problems decoded greedily per model (secondary metrics)
    max_new_tokens: int
    model: ModelSize
    reference: Run
    warm: Run
    student: Run


DEFAULT = SelectionSize(
    n_clean=3000, n_train=4000, n_pool=1500, n_eval=300, n_generate=100, max_new_tokens=120, model=ModelSize(128, 4),
    reference=Run(steps=900), warm=Run(steps=120), student=Run(steps=250, save_every=50),
)
QUICK = SelectionSize(
    n_clean=48, n_train=64, n_pool=32, n_eval=8, n_generate=4, max_new_tokens=24, model=ModelSize(64, 1),
    reference=Run(steps=3, batch_tokens=1536), warm=Run(steps=2, batch_tokens=1536), student=Run(steps=4, batch_tokens=1536, save_every=2),
)


def claims() -> list[Claim]:
    """What the study tests (docs/demo.md states why each margin)."""
    return [
        Claim("selection", "Rho-1 beats uniform SFT (lower skill NLL)", (Part(PRIMARY, {"uniform": 1, "rho1": -1}, 0.0, 1, " nats"),)),
        Claim("selection", "Rho-1 recovers at least half of the oracle's gain over uniform (skill NLL)",
              (Part(PRIMARY, {"uniform": 0.5, "rho1": -1, "oracle": 0.5}, 0.0, 1, " nats"),)),
        Claim("selection", "Rho-1 avoids the corpus's wrong carry rule without reading its labels (carry margin)",
              (Part("carry_margin", {"rho1": 1, "uniform": -1}, 0.0, 1, " nats"),)),
        Claim("selection", "aggressive hard selection (topk k=0.6) fragments; the δ variant does not", (
            Part("well_formed", {"uniform": 1, "token_cleaning": -1}, 0.10, 100, " pts"),
            Part("well_formed", {"cleaning": 1, "uniform": -1}, -0.02, 100, " pts"),
        )),
    ]


# ----------------------------------------------------------------------------------------------
# Evaluation of one student


def curve_scores(final: Path, problems: list[dict], cache: Path) -> dict[str, np.ndarray]:
    """Teacher-forced values per problem: final token accuracy, skill NLL, carry margin; the accuracy curve's area."""
    if cache.exists():
        return {key: np.array(value, dtype=float) for key, value in json.loads(cache.read_text()).items()}
    curve = []
    for checkpoint in checkpoints(final):
        model, tokenizer = load(checkpoint)
        scores = problem_scores(model, tokenizer, problems)
        curve.append(scores.token_accuracy)
    values = {"accuracy_auc": np.mean(curve, axis=0), "token_accuracy": scores.token_accuracy, "skill_nll": scores.skill_nll,
              "carry_margin": scores.carry_margin, "curve": np.array(curve)}
    write_text_atomic(cache, json.dumps({k: np.asarray(v).tolist() for k, v in values.items()}) + "\n")
    return values


def generation_scores(final: Path, problems_path: Path, size: SelectionSize, out: Path) -> dict[str, np.ndarray]:
    """Greedy exact match and the well-formed share on the first n_generate problems."""
    if not (out / "eval.json").exists():
        evaluate(EvalConfig(checkpoint=final, records=problems_path, out_dir=out, max_new_tokens=size.max_new_tokens, limit=size.n_generate))
    outcomes = generation_outcomes(out, problems_path)
    return {"exact_match": outcomes["correct"], "well_formed": outcomes["well_formed"]}


# ----------------------------------------------------------------------------------------------
# Entry point


def run_selection(root: Path, size: SelectionSize, seeds: int, split: str) -> dict:
    """Train and evaluate the study; returns {"table": metric → policy → (S, P), "rows": [...], "notes": {...}}."""
    # ---- data, the reference on the clean set, its exact match on the validation split
    data = generate(DemoDataConfig(out_dir=root / "data", n_clean=size.n_clean, n_train=size.n_train, n_valid=size.n_eval,
                                   n_test=size.n_eval, n_pool=size.n_pool))
    init = init_model(root / "init", size.model)
    clean = score_once(root / "shards" / "clean", data["clean"], tokenizer=data["tokenizer"])
    reference = train_once(root / "reference", clean, init, "uniform", size.reference, seed=0)
    reference_valid = generation_scores(reference, data["valid"], size, root / "reference" / "eval-valid")

    # ---- the corpus scored by the reference, then by each seed's warm start (trained on the disjoint pool)
    train_ref = score_once(root / "shards" / "train_ref", data["train"], model=reference)
    pool = score_once(root / "shards" / "pool", data["pool"], tokenizer=data["tokenizer"])
    warm = {s: train_once(root / "warm" / f"seed{s}", pool, init, "uniform", size.warm, seed=s) for s in range(seeds)}
    shards = {s: add_model_once(root / "shards" / f"train_seed{s}", train_ref, warm[s], "base") for s in range(seeds)}

    # ---- students: every policy × seed from that seed's warm start
    problems_path = data[split]
    problems = [json.loads(line) for line in problems_path.read_text().splitlines()]
    table: dict[str, dict[str, list]] = {}
    specs = {}
    for name, policy in POLICIES.items():
        for s in range(seeds):
            spec = resolved_spec(shards[s], policy.spec, root / "shards" / f"phi_{name}_seed{s}") if policy.global_terms else policy.spec
            specs[name] = spec
            final = train_once(root / "students" / name / f"seed{s}", shards[s], warm[s], spec, size.student, seed=s, **dict(policy.options))
            values = curve_scores(final, problems, final.parent / f"teacher-{split}.json")
            values |= generation_scores(final, problems_path, size, final.parent / f"eval-{split}")
            for metric, array in values.items():
                table.setdefault(metric, {}).setdefault(name, []).append(array)
    table = {metric: {name: np.stack(arrays) for name, arrays in by_policy.items()} for metric, by_policy in table.items()}

    # ---- per-policy summary rows (means over seeds and problems) and what each offline spec keeps
    rows = [{"name": name, "spec": specs[name], "options": dict(POLICIES[name].options),
             "metrics": {metric: float(np.nanmean(table[metric][name])) for metric in table if metric != "curve"},
             "kept": kept_shares(shards[0], specs[name])} for name in POLICIES]
    notes = {"reference_valid_exact_match": float(reference_valid["exact_match"].mean()), "primary": PRIMARY,
             "checkpoints": [int(p.name.split("-")[1]) for p in checkpoints(final)], "shards_seed0": str(shards[0]), "specs": specs}
    return {"table": table, "rows": rows, "notes": notes}
