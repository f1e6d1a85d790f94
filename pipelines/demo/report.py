"""The study's report: the claims table first, then one table per study, the variance split, learning curves,
and token heatmaps of the offline selection policies (report.md, results.json, curves.png, heatmap_*.html).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.demo.claims import Verdict, claims_table
from pipelines.demo.stats import variance_split
from scoring.shards import atomic_write, write_text_atomic

# Columns of each study's table: (metric, header, scale, digits).
COLUMNS = {
    "selection": [("accuracy_auc", "token acc. AUC %", 100, 1), ("token_accuracy", "token acc. %", 100, 1), ("skill_nll", "skill NLL", 1, 3),
                  ("carry_margin", "carry margin (nats)", 1, 2), ("exact_match", "exact match %", 100, 1), ("well_formed", "well-formed %", 100, 1)],
    "unlearning": [("toxic_greedy", "toxic, greedy %", 100, 1), ("toxic_prefilled", "toxic, prefilled %", 100, 1), ("toxic_nll", "forget NLL", 1, 3),
                   ("impatient_exact", "exact match, impatient %", 100, 1), ("impatient_well_formed", "well-formed, impatient %", 100, 1),
                   ("token_accuracy", "token acc. %", 100, 1), ("skill_nll", "skill NLL", 1, 3)],
    "text": [("forget_train", "forget, train", 1, 3), ("forget_heldout", "forget, held-out", 1, 3), ("retain_heldout", "retain, held-out", 1, 3),
             ("distance_to_oracle", "Σ |Δ oracle|", 1, 3)],
}
KEPT = ("clean", "wrong_carry", "noise", "toxic")


def options_text(options: dict) -> str:
    return ", ".join(f"{key.replace('_', '-')} {value}" for key, value in options.items())


def study_table(study: str, rows: list[dict], n_seeds: int) -> str:
    """Markdown: one line per model, metrics as means over seeds and problems (NLL per character for text)."""
    columns = COLUMNS[study]
    kept = study == "selection"
    header = "| model | Φ spec | options | " + " | ".join(c[1] for c in columns) + (" | kept: clean / wrong carry / noise / toxic % |" if kept else " |")
    lines = [header, "|" + " --- |" * (3 + len(columns) + kept)]
    for row in rows:
        cells = [f"{row['metrics'][m] * scale:.{digits}f}" if m in row["metrics"] and np.isfinite(row["metrics"][m]) else "–"
                 for m, _, scale, digits in columns]
        if kept:
            shares = row.get("kept")
            cells.append("online" if shares is None else " / ".join(f"{100 * shares.get(k, 0):.1f}" for k in KEPT))
        lines.append(f"| {row['name']} | `{row['spec']}` | {options_text(row['options']) or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMeans over {n_seeds} seed(s) and the held-out problems (records for the text study).\n"


def variance_text(table: dict, metric: str, policies: tuple[str, ...]) -> str:
    """How much of the spread between seeds is the seeds' own (not problem sampling), per policy."""
    parts = []
    for policy in policies:
        split = variance_split(table[metric][policy])
        if np.isfinite(split.seed_share):
            parts.append(f"{policy}: var(seed means) {split.between_seeds:.2e}, from problems alone {split.within_seeds:.2e}, "
                         f"seed share {100 * split.seed_share:.0f} %")
    return "; ".join(parts)


def write_curves(path: Path, table: dict, checkpoints: list[int]) -> None:
    """Token accuracy on the held-out problems at each checkpoint, mean over seeds, one line per policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for policy, curves in table["curve"].items():  # (S, checkpoints, P)
        ax.plot(checkpoints, 100 * np.nanmean(curves, axis=(0, 2)), label=policy, marker="o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="token accuracy on held-out problems %", title="selection study: learning curves (mean over seeds)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def write_report(report: Path, title: str, verdicts: list[Verdict], results: dict[str, dict], n_seeds: int) -> Path:
    """report.md (claims, then each study), results.json, curves.png and heatmaps; returns report.md."""
    from pipelines.inspect_shards import InspectConfig, inspect_shards

    report.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}\n", "## Claims\n", claims_table(verdicts, n_seeds)]
    for study, result in results.items():
        sections += [f"## {study} study\n", study_table(study, result["rows"], n_seeds)]
        if study == "selection":
            notes = result["notes"]
            sections.append(f"Reference: exact match {100 * notes['reference_valid_exact_match']:.1f} % on the validation split. "
                            f"Primary metric: {notes['primary']}. Seeds vs problems ({notes['primary']}): "
                            f"{variance_text(result['table'], notes['primary'], ('uniform', 'rho1')) or 'one seed'}.\n")
            write_curves(report / "curves.png", result["table"], notes["checkpoints"])
            for name in ("highpass", "token_cleaning", "cleaning"):
                phi_shards = Path(notes["shards_seed0"]).parent / f"phi_{name}_view"
                if not (phi_shards / "_manifest.json").exists():
                    from pipelines.demo.stages import resolved_spec

                    resolved_spec(Path(notes["shards_seed0"]), notes["specs"][name], phi_shards)  # Φ written to `weight` for the heatmap
                inspect_shards(InspectConfig(shards=phi_shards, html=report / f"heatmap_{name}.html", samples=12))
        if study == "unlearning":
            sections.append(f"The start model's toxic rate (greedy, impatient prompt): {100 * result['notes']['start_toxic_greedy']:.1f} %.\n")
    text = "\n".join(sections)
    serialisable = {study: {"rows": r["rows"], "notes": r["notes"]} for study, r in results.items()}
    verdict_rows = [{"study": v.claim.study, "claim": v.claim.text, "p_value": v.p_value, "held": v.held,
                     "intervals": [vars(i) for i in v.intervals]} for v in verdicts]
    write_text_atomic(report / "results.json", json.dumps({"title": title, "claims": verdict_rows, "studies": serialisable}, indent=2, default=float) + "\n")
    write_text_atomic(report / "report.md", text)
    return report / "report.md"
