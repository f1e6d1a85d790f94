"""The text study: forget one speaker of Tiny Shakespeare, and compare the unlearning losses with an oracle.

A base model trains on every speaker (pipelines/demo/text.py); the oracle trains the same way (same seed,
learning rate and number of epochs, so fewer steps) on the same records with the speaker's speeches
removed, as if they had never been in the data. Each unlearning
policy starts from the base and trains on the full corpus with the speaker's lines labelled `forget`;
npo and refclip compare with the base's own statistics (the corpus scored by the base as `ref`).

Metrics, NLL per character (the character tokenizer: one token per character) of every model on
    forget_train     the speaker's lines in the training records (what was to be forgotten)
    forget_heldout   the speaker's lines in held-out records (the speaker's style in general)
    retain_heldout   everyone else's held-out text (what must survive)
and each policy's distance to the oracle, Σ over the three of |NLL − NLL_oracle|. The unit of resampling is
the record (records hold the NLL sums and token counts of each category).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.demo.claims import Claim
from pipelines.demo.stages import ModelSize, Run, init_model, load, score_once, train_once
from pipelines.demo.text import FORGET_LABEL, TextDataConfig, generate_text
from scoring.shards import open_shards, read_table, write_text_atomic

SIGNED = (("normalize", "tokens"),)
POLICIES = {
    "mask": ("labels(forget=0)", ()),
    "ascent_clip": ("labels(forget=-1)", SIGNED + (("neg_loss", "clip"),)),
    "npo": ("labels(forget=-1)", SIGNED + (("neg_loss", "npo"),)),
    "refclip": ("labels(forget=-1)", SIGNED + (("neg_loss", "refclip"),)),
}
CATEGORIES = ("forget_train", "forget_heldout", "retain_heldout")


@dataclass(frozen=True)
class TextSize:
    record_chars: int
    speeches: tuple[int, int]  # the slice of the play's speeches used
    max_train_records: int  # 0: all
    model: ModelSize
    base: Run  # the base model and the oracle
    student: Run


DEFAULT = TextSize(record_chars=600, speeches=(2400, 4000), max_train_records=0, model=ModelSize(128, 4), base=Run(steps=350), student=Run(steps=100))
QUICK = TextSize(record_chars=300, speeches=(2805, 2860), max_train_records=12, model=ModelSize(64, 1), base=Run(steps=3, batch_tokens=1536),
                 student=Run(steps=2, batch_tokens=1536))


def corpus_tokens(shards: Path) -> int:
    return int(open_shards(shards).manifest["totals"]["tokens"])


def nll_by_record(checkpoint: Path, eval_sets: dict[str, Path], cache: Path) -> dict[str, np.ndarray]:
    """Per evaluation record: the NLL sum (nats) and token count of each category, as (R,) arrays."""
    if cache.exists():
        return {key: np.array(value, dtype=float) for key, value in json.loads(cache.read_text()).items()}
    from scoring.hf_backend import score_windows_hf

    model, _ = load(checkpoint)
    sums, counts = {c: [] for c in CATEGORIES}, {c: [] for c in CATEGORIES}
    for split, shards in eval_sets.items():
        for path in open_shards(shards).paths:
            table = read_table(path, columns=["doc_id", "input_ids", "loss_mask", "label"], validate=False)
            stats = score_windows_hf(model, table.column("input_ids").to_pylist(), device=model.device, batch_tokens=8192,
                                     logits_budget_bytes=64 * 2**20)
            by_doc: dict[str, dict[str, list[float]]] = {}
            for doc_id, mask, labels, (logprob, _) in zip(table.column("doc_id").to_pylist(), table.column("loss_mask").to_pylist(),
                                                          table.column("label").to_pylist(), stats):
                record = by_doc.setdefault(doc_id, {c: [0.0, 0] for c in CATEGORIES})
                mask, forget = np.asarray(mask, dtype=bool), np.array([label == FORGET_LABEL for label in labels])
                parts = {f"forget_{split}": mask & forget, "retain_heldout": mask & ~forget if split == "heldout" else None}
                for category, where in parts.items():
                    if where is not None:
                        record[category][0] -= float(logprob[where].astype(np.float64).sum())
                        record[category][1] += int(where.sum())
            for record in by_doc.values():
                for category in CATEGORIES:
                    sums[category].append(record[category][0])
                    counts[category].append(record[category][1])
    values = {f"sum_{c}": np.array(sums[c]) for c in CATEGORIES} | {f"count_{c}": np.array(counts[c], dtype=float) for c in CATEGORIES}
    write_text_atomic(cache, json.dumps({k: v.tolist() for k, v in values.items()}) + "\n")
    return values


def aggregate_nll(values: dict, policy: str, seeds: np.ndarray, records: np.ndarray) -> dict[str, float]:
    """NLL per character of each category over the (resampled) seeds and records."""
    return {c: float(values[f"sum_{c}"][policy][seeds, records].sum() / max(values[f"count_{c}"][policy][seeds, records].sum(), 1.0))
            for c in CATEGORIES}


def distance_to_oracle(values: dict, policy: str, seeds: np.ndarray, records: np.ndarray) -> float:
    ours, oracle = aggregate_nll(values, policy, seeds, records), aggregate_nll(values, "oracle", seeds, records)
    return sum(abs(ours[c] - oracle[c]) for c in CATEGORIES)


def closest_claim(values: dict) -> Claim:
    """The policy closest to the oracle on all the data, and the claim that it beats the runner-up."""
    every_seed = np.arange(values["sum_forget_train"]["oracle"].shape[0])[:, None]
    every_record = np.tile(np.arange(values["sum_forget_train"]["oracle"].shape[1]), (len(every_seed), 1))
    ranked = sorted(POLICIES, key=lambda name: distance_to_oracle(values, name, every_seed, every_record))
    best, runner_up = ranked[0], ranked[1]

    def margin(table, seeds, records):
        return distance_to_oracle(table, runner_up, seeds, records) - distance_to_oracle(table, best, seeds, records)

    return Claim("text", f"{best} lands closest to the oracle retrain (ahead of {runner_up})", statistic=margin,
                 statistic_text=f"distance({runner_up}) − distance({best}) > 0 (nats per character, Σ of 3 categories)")


def run_text(root: Path, size: TextSize, seeds: int) -> dict:
    """Train and evaluate the study; returns {"table": metric → policy → (S, R), "rows": [...], "notes": {...}} (claim: closest_claim)."""
    # ---- data, the base on everyone, the oracle without the speaker (same steps and seed)
    data = generate_text(TextDataConfig(out_dir=root / "data", first_speech=size.speeches[0], last_speech=size.speeches[1],
                                        record_chars=size.record_chars, max_train_records=size.max_train_records))
    init = init_model(root / "init", size.model)  # a config and the character tokenizer
    train_unscored = score_once(root / "shards" / "train_unscored", data["train"], tokenizer=init)
    oracle_shards = score_once(root / "shards" / "oracle_train", data["oracle_train"], tokenizer=init)
    heldout = score_once(root / "shards" / "heldout", data["heldout"], tokenizer=init)
    base = train_once(root / "base", train_unscored, init, "uniform", size.base, seed=0)
    oracle_steps = round(size.base.steps * corpus_tokens(oracle_shards) / corpus_tokens(train_unscored))  # the same epochs as the base
    oracle = train_once(root / "oracle", oracle_shards, init, "uniform", replace(size.base, steps=oracle_steps), seed=0)
    shards = score_once(root / "shards" / "train", data["train"], model=base)

    # ---- students from the base; every model's NLL per record and category
    eval_sets = {"train": shards, "heldout": heldout}
    per_model = {"base": nll_by_record(base, eval_sets, base.parent / "nll.json"), "oracle": nll_by_record(oracle, eval_sets, oracle.parent / "nll.json")}
    table: dict[str, dict[str, list]] = {}
    for name, (spec, options) in POLICIES.items():
        for s in range(seeds):
            final = train_once(root / "students" / name / f"seed{s}", shards, base, spec, size.student, seed=s, **dict(options))
            for metric, array in nll_by_record(final, eval_sets, final.parent / "nll.json").items():
                table.setdefault(metric, {}).setdefault(name, []).append(array)
    table = {metric: {name: np.stack(arrays) for name, arrays in by_policy.items()} for metric, by_policy in table.items()}
    for name in ("base", "oracle"):  # one run each: the same values for every seed
        for metric, array in per_model[name].items():
            table[metric][name] = np.tile(array, (seeds, 1))

    # ---- rows: NLL per category and the distance to the oracle
    every_seed, every_record = np.arange(seeds)[:, None], np.tile(np.arange(table["sum_forget_train"]["oracle"].shape[1]), (seeds, 1))
    rows = [{"name": name, "spec": POLICIES[name][0] if name in POLICIES else "uniform", "options": dict(POLICIES[name][1]) if name in POLICIES else {},
             "metrics": aggregate_nll(table, name, every_seed, every_record) | {"distance_to_oracle": distance_to_oracle(table, name, every_seed, every_record)}}
            for name in ("base", "oracle", *POLICIES)]
    return {"table": table, "rows": rows, "notes": {"oracle_steps": oracle_steps, "base_steps": size.base.steps}}
