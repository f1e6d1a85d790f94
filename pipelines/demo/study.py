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
import time
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


def run_demo(cfg: DemoConfig) -> Path:
    """Run the chosen studies into cfg.out, print the claims table and return the report's path."""
    # ---- configuration: one run folder per preset
    problems = validate(cfg)
    if problems:
        raise ValueError("demo: " + "; ".join(problems))
    run, started = Path(cfg.out), time.perf_counter()
    presets = sizes(cfg.quick)
    identity = {"quick": cfg.quick, "sizes": {name: asdict(size) for name, size in presets.items()}}
    saved = run / "demo_config.json"
    if saved.exists() and json.loads(saved.read_text()) != identity:
        raise ValueError(f"{run} holds studies of other sizes ({saved}); pass a new --out or delete that folder.")
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(identity, indent=2) + "\n")
    chosen = STUDIES if cfg.study == "all" else (cfg.study,)

    # ---- the studies
    results, claims = {}, []
    if "selection" in chosen:
        results["selection"] = selection.run_selection(run / "selection", presets["selection"], cfg.seeds, cfg.eval_split)
        claims += selection.claims()
    if "unlearning" in chosen:
        results["unlearning"] = unlearning.run_unlearning(run / "unlearning", presets["unlearning"], cfg.seeds, cfg.eval_split)
        claims += unlearning.claims()
    if "text" in chosen:
        results["text"] = textstudy.run_text(run / "text", presets["text"], cfg.seeds)
        claims.append(results["text"]["claim"])

    # ---- claims, Holm-corrected together, and the report
    verdicts = judge(claims, {study: result["table"] for study, result in results.items()})
    minutes = (time.perf_counter() - started) / 60
    title = f"tokenprio demo: {', '.join(chosen)}; {cfg.seeds} seed(s), {cfg.eval_split} split, this call {minutes:.1f} min"
    report = write_report(run / f"report-{cfg.eval_split}", title, verdicts, results, cfg.seeds)
    print(report.read_text())
    return report
