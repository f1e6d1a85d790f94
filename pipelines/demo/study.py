"""`tokenprio demo`: token-priority studies on one CPU, on embedded data (no downloads), with claims tested.

Three studies (docs/demo.md has their design, numbers and limits), each stage skipped when its output is
already in the run folder:

    selection   (pipelines/demo/selection.py)   which Φ policy learns column addition best from a noisy corpus
    unlearning  (pipelines/demo/unlearning.py)  removing a toxic phrase that masking alone cannot remove
    text        (pipelines/demo/textstudy.py)   forgetting one Tiny Shakespeare speaker, against an oracle retrain

Policies are compared on paired values (same seeds, same held-out problems); every claim is a one-sided
test with the hierarchical paired bootstrap, Holm-corrected over all the claims of the run
(pipelines/demo/claims.py, stats.py). The report (report-{split}/report.md) opens with the claims table.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.demo import selection, textstudy, unlearning
from pipelines.demo.claims import judge
from pipelines.demo.report import write_report
from scoring.shards import write_text_atomic

STUDIES = ("selection", "unlearning", "text")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")  # run folder (stages already there are reused)
    study: str = "all"  # selection | unlearning | text | all
    seeds: int = 1  # paired seeds 0..seeds-1 (student initialisation and data order)
    quick: bool = False  # tiny sizes for a test; the numbers mean nothing
    eval_split: str = "test"  # test | valid (valid: for choosing settings); the text study uses its held-out records


def validate(cfg: DemoConfig) -> list[str]:
    problems = []
    if cfg.study not in (*STUDIES, "all"):
        problems.append(f"--study {cfg.study!r}: choose {', '.join(STUDIES)} or all")
    if cfg.seeds < 1:
        problems.append(f"--seeds {cfg.seeds}: must be at least 1")
    if cfg.eval_split not in ("test", "valid"):
        problems.append(f"--eval-split {cfg.eval_split!r}: choose test or valid")
    return problems


def sizes(quick: bool) -> dict:
    return {"selection": selection.QUICK if quick else selection.DEFAULT, "unlearning": unlearning.QUICK if quick else unlearning.DEFAULT,
            "text": textstudy.QUICK if quick else textstudy.DEFAULT}


def run_studies(run: Path, studies: tuple[str, ...], quick: bool, seeds: int, split: str) -> dict[str, dict]:
    """Run `studies` one after the other in this process, on one torch thread (see `run_demo`)."""
    import torch

    torch.set_num_threads(1)
    presets, results = sizes(quick), {}
    for study in studies:
        if study == "selection":
            results[study] = selection.run_selection(run / "selection", presets["selection"], seeds, split)
        elif study == "unlearning":
            results[study] = unlearning.run_unlearning(run / "unlearning", presets["unlearning"], seeds, split)
        else:
            results[study] = textstudy.run_text(run / "text", presets["text"], seeds)
    return results


def study_groups(chosen: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Studies per process: the selection study alone, the others together (about as long), when there are two cores."""
    if len(chosen) > 1 and (os.cpu_count() or 1) >= 2:
        return [tuple(s for s in chosen if s == "selection"), tuple(s for s in chosen if s != "selection")]
    return [chosen]


def run_demo(cfg: DemoConfig) -> Path:
    """Run the chosen studies into cfg.out, print the claims table and return the report's path."""
    # ---- configuration: one run folder per preset
    problems = validate(cfg)
    if problems:
        raise ValueError("demo: " + "; ".join(problems))
    run, started = Path(cfg.out), time.perf_counter()
    presets = sizes(cfg.quick)
    identity = json.loads(json.dumps({"quick": cfg.quick, "sizes": {name: asdict(size) for name, size in presets.items()}}))  # as saved
    saved = run / "demo_config.json"
    if saved.exists() and json.loads(saved.read_text()) != identity:
        raise ValueError(f"{run} holds studies of other sizes ({saved}); pass a new --out or delete that folder.")
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(identity, indent=2) + "\n")
    chosen = STUDIES if cfg.study == "all" else (cfg.study,)

    # ---- the studies: each process on one torch thread (the models are small; a second thread of one process mostly
    # waits on the first, and under load stalls it), the selection study beside the other two when there are two cores
    groups = [g for g in study_groups(chosen) if g]
    print(f"demo: {', '.join(chosen)} in {len(groups)} process(es) of one torch thread each: {groups}")
    if len(groups) == 1:
        results = run_studies(run, groups[0], cfg.quick, cfg.seeds, cfg.eval_split)
    else:
        with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_studies, run, g, cfg.quick, cfg.seeds, cfg.eval_split) for g in groups]
            results = {}
            for future in futures:
                results |= future.result()
    results = {study: results[study] for study in chosen}
    claims = []
    claims += selection.claims() if "selection" in results else []
    claims += unlearning.claims() if "unlearning" in results else []
    claims += [textstudy.closest_claim(results["text"]["table"])] if "text" in results else []

    # ---- claims, Holm-corrected together, and the report
    verdicts = judge(claims, {study: result["table"] for study, result in results.items()})
    minutes = (time.perf_counter() - started) / 60
    title = f"tokenprio demo: {', '.join(chosen)}; {cfg.seeds} seed(s), {cfg.eval_split} split, this call {minutes:.1f} min"
    report = write_report(run / f"report-{cfg.eval_split}", title, verdicts, results, cfg.seeds)
    print(report.read_text())
    return report
