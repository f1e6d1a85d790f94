"""`tokenprio inspect`: summarise a shard folder; optionally draw sample documents as HTML (tokens coloured
by Φ) and a PNG histogram of Φ.

Streams row group by row group (about 1M tokens each), reading only the columns the summary needs, so
memory holds one row group and fixed-size tallies whatever the corpus size. Φ quantiles come from a
fixed-bin histogram that also keeps each bin's smallest and largest value (see `histogram_quantile`).
"""

from __future__ import annotations

import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from scoring.frames import token_frame
from scoring.shards import ShardError, ShardSet, atomic_write, open_shards, read_metadata, write_text_atomic

PHI_EDGES = np.arange(-1000, 1001) / 100  # Φ bin edges: width 0.01 on [-10, 10], plus one open bin each side
N_BINS = len(PHI_EDGES) + 1
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
NEGATIVE_RGB = (214, 39, 40)  # red: Φ < 0 (unlearning)
POSITIVE_RGB = (31, 119, 180)  # blue: Φ > 0
ZERO_COLOUR = "rgb(200,200,200)"  # grey: a target with Φ = 0 (deselected)


@dataclass(frozen=True)
class InspectConfig:
    shards: Path  # shard folder (part-*.parquet + _manifest.json)
    html: Path | None = None  # write a self-contained HTML page of sample documents here
    png: Path | None = None  # write a histogram of Φ over trainable tokens here
    samples: int = 5  # documents shown in the HTML page (the first ones in shard order)
    tokenizer: Path | None = None  # decode token ids with this tokenizer (default: slices of the stored text)


def validate(cfg: InspectConfig) -> list[str]:
    problems = []
    if cfg.samples < 1:
        problems.append(f"--samples {cfg.samples}: show at least 1 document.")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        problems.append(f"--tokenizer {cfg.tokenizer}: no such tokenizer folder or file.")
    for option, path in (("--html", cfg.html), ("--png", cfg.png)):
        if path is not None and not Path(path).parent.is_dir():
            problems.append(f"{option} {path}: folder {Path(path).parent} does not exist; create it first.")
    return problems


# ----------------------------------------------------------------------------------------------
# Tallies over row groups


@dataclass
class Tally:
    """Running sums over row groups: all the summary needs, in O(bins + labels + models) memory."""

    rows: int = 0
    documents: int = 0
    tokens: int = 0
    targets: int = 0
    phi_sum: float = 0.0  # Σ Φ over targets (float64)
    phi_zero: int = 0
    phi_negative: int = 0
    phi_counts: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))
    phi_low: np.ndarray = field(default_factory=lambda: np.full(N_BINS, np.inf))  # smallest Φ per bin
    phi_high: np.ndarray = field(default_factory=lambda: np.full(N_BINS, -np.inf))  # largest Φ per bin
    labels: dict = field(default_factory=dict)  # label -> [tokens, targets, Σ Φ over targets]
    stat_sums: dict = field(default_factory=dict)  # "{prefix}_nll" / "{prefix}_entropy" -> Σ over targets (nats)


def _flat(table: pa.Table, name: str) -> np.ndarray:
    return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)


def add_row_group(tally: Tally, table: pa.Table, prefixes: list[str], where: str) -> None:
    """Add one row group (columns window, n_tokens, loss_mask, weight, label and statistics) to the tally."""
    mask = _flat(table, "loss_mask").astype(bool)  # (tokens,)
    weight = _flat(table, "weight").astype(np.float64)  # (tokens,) Φ
    phi = weight[mask]  # (targets,)
    if not np.isfinite(phi).all():
        raise ShardError(f"{where}: column 'weight' holds non-finite values; recompute it with `tokenprio reweight`.")
    tally.rows += table.num_rows
    tally.documents += int(pc.sum(pc.equal(table.column("window"), 0)).as_py() or 0)  # one window 0 per document
    tally.tokens += len(mask)
    tally.targets += len(phi)
    tally.phi_sum += float(phi.sum())
    tally.phi_zero += int((phi == 0).sum())
    tally.phi_negative += int((phi < 0).sum())
    bins = np.searchsorted(PHI_EDGES, phi, side="right")  # 0: below -10, N_BINS - 1: at or above 10
    tally.phi_counts += np.bincount(bins, minlength=N_BINS)
    np.minimum.at(tally.phi_low, bins, phi)
    np.maximum.at(tally.phi_high, bins, phi)

    by_label = pa.table({"label": pc.list_flatten(table.column("label")), "target": mask.astype(np.int64), "phi": np.where(mask, weight, 0.0)})
    grouped = by_label.group_by("label").aggregate([("target", "count"), ("target", "sum"), ("phi", "sum")])
    for row in grouped.to_pylist():
        if row["label"] is not None:
            sums = tally.labels.setdefault(row["label"], [0, 0, 0.0])
            sums[0] += row["target_count"]
            sums[1] += row["target_sum"]
            sums[2] += row["phi_sum"]

    for prefix in prefixes:
        nll = -_flat(table, f"{prefix}_logprob").astype(np.float64)[mask]
        entropy = _flat(table, f"{prefix}_entropy").astype(np.float64)[mask]
        tally.stat_sums[f"{prefix}_nll"] = tally.stat_sums.get(f"{prefix}_nll", 0.0) + float(nll.sum())
        tally.stat_sums[f"{prefix}_entropy"] = tally.stat_sums.get(f"{prefix}_entropy", 0.0) + float(entropy.sum())


def histogram_quantile(counts: np.ndarray, low: np.ndarray, high: np.ndarray, q: float) -> float:
    """Nearest-rank quantile, as np.quantile(values, q, method="inverted_cdf"), from binned values.

    The value of rank ⌈q·n⌉ lies in a known bin; inside it the values are taken as evenly spread between
    the bin's smallest and largest value. So the result is exact when that bin holds one distinct value (hard
    selection, label weights) and otherwise within the bin's span: 0.01 inside [-10, 10].
    """
    cumulative = np.cumsum(counts)
    rank = max(1, math.ceil(q * cumulative[-1]))  # 1-based
    b = int(np.searchsorted(cumulative, rank))
    within = rank - (cumulative[b] - counts[b])  # 1 .. counts[b]
    if counts[b] == 1:
        return float(low[b])
    return float(low[b] + (high[b] - low[b]) * (within - 1) / (counts[b] - 1))


def summarise(tally: Tally, source: ShardSet, prefixes: list[str]) -> dict:
    """The summary dict from the tallies; Φ, label means and model means are None where there are no targets."""
    targets = tally.targets
    phi = None
    if targets:
        phi = {"min": float(tally.phi_low[tally.phi_counts > 0][0]), "max": float(tally.phi_high[tally.phi_counts > 0][-1])}
        phi |= {f"p{round(q * 100):02d}": histogram_quantile(tally.phi_counts, tally.phi_low, tally.phi_high, q) for q in QUANTILES}
        phi |= {"mean": tally.phi_sum / targets, "zero_share": tally.phi_zero / targets, "negative_share": tally.phi_negative / targets}
    labels = {
        label: {"tokens": tokens, "trainable_tokens": label_targets, "mean_phi": phi_sum / label_targets if label_targets else None}
        for label, (tokens, label_targets, phi_sum) in sorted(tally.labels.items())
    }
    models = {
        prefix: {
            "mean_nll": tally.stat_sums[f"{prefix}_nll"] / targets if targets else None,
            "mean_entropy": tally.stat_sums[f"{prefix}_entropy"] / targets if targets else None,
        }
        for prefix in prefixes
    }
    return {
        "folder": str(source.folder),
        "shards": len(source.paths),
        "documents": tally.documents,
        "rows": tally.rows,
        "tokens": tally.tokens,
        "trainable_tokens": targets,
        "phi": phi,
        "labels": labels,
        "models": models,
        "metadata": {key: value for key, value in source.metadata.items() if key != "shard"},  # "shard": the first file's own facts
    }


# ----------------------------------------------------------------------------------------------
# Text, HTML and PNG


def _number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summary: dict) -> str:
    """The summary as a compact plain-text table (what `tokenprio inspect` prints)."""
    share = summary["trainable_tokens"] / summary["tokens"] if summary["tokens"] else 0.0
    lines = [
        f"shards     {summary['folder']} ({summary['shards']} files)",
        f"documents  {summary['documents']:,}   rows {summary['rows']:,}   tokens {summary['tokens']:,}   "
        f"trainable {summary['trainable_tokens']:,} ({share:.1%})",
    ]
    phi = summary["phi"]
    if phi is None:
        lines.append("Φ          no trainable tokens")
    else:
        names = ["min"] + [f"p{round(q * 100):02d}" for q in QUANTILES] + ["max", "mean"]
        lines.append("Φ (trainable)  " + "  ".join(f"{name:>8}" for name in names) + "   zero  negative")
        lines.append(
            "               " + "  ".join(f"{phi[name]:>8.4g}" for name in names) + f"  {phi['zero_share']:>5.1%}  {phi['negative_share']:>8.1%}"
        )
    if summary["labels"]:
        lines.append(f"{'label':<14} {'tokens':>10} {'trainable':>10} {'mean Φ':>8}")
        for label, counts in summary["labels"].items():
            lines.append(f"{label:<14} {counts['tokens']:>10,} {counts['trainable_tokens']:>10,} {_number(counts['mean_phi']):>8}")
    if summary["models"]:
        lines.append(f"{'model':<14} {'mean NLL':>10} {'entropy':>10}   (nats, over trainable tokens)")
        for prefix, means in summary["models"].items():
            lines.append(f"{prefix:<14} {_number(means['mean_nll']):>10} {_number(means['mean_entropy']):>10}")
    lines.append("metadata")
    lines += [f"  {key}: {json.dumps(value, sort_keys=True)}" for key, value in sorted(summary["metadata"].items())]
    return "\n".join(lines)


def phi_colour(phi: float, scale: float) -> str:
    """Background of a trainable token: red for Φ < 0, grey for 0, blue for Φ > 0; opacity 0.2 + 0.8·|Φ|/scale."""
    if phi == 0:
        return ZERO_COLOUR
    r, g, b = NEGATIVE_RGB if phi < 0 else POSITIVE_RGB
    return f"rgba({r},{g},{b},{0.2 + 0.8 * min(abs(phi) / scale, 1.0):.2f})"


def sample_rows(source: ShardSet, n_documents: int) -> pd.DataFrame:
    """All rows of the first `n_documents` documents in shard order (a document's windows are consecutive rows)."""
    chosen: dict[str, None] = {}
    pieces = []
    for path in source.paths:
        parquet = pq.ParquetFile(path)
        for i in range(parquet.num_row_groups):
            table = parquet.read_row_group(i)
            doc_ids = table.column("doc_id").to_pylist()
            for doc_id in doc_ids:
                if len(chosen) < n_documents:
                    chosen.setdefault(doc_id)
            keep = [doc_id in chosen for doc_id in doc_ids]
            pieces.append(table.filter(pa.array(keep)).to_pandas())
            if not all(keep):  # a document after the chosen ones: they are complete
                return pd.concat(pieces, ignore_index=True)
    return pd.concat(pieces, ignore_index=True)


def _token_span(token: dict, shown: str, prefixes: list[str], scale: float) -> str:
    """One token as an HTML span: `shown` as its visible text, coloured by Φ, the token itself in the tooltip."""
    text = token["token"] if isinstance(token["token"], str) else f"[{token['input_id']}]"
    label = token["label"] if isinstance(token["label"], str) else "-"
    nlls = " | ".join(f"{prefix} NLL {token[f'{prefix}_nll']:.3f}" for prefix in prefixes)
    if token["loss_mask"]:
        style, phi = f"background:{phi_colour(token['weight'], scale)}", f"Φ {token['weight']:.4g}"
    else:
        style, phi = "color:#999", "not a target"
    tooltip = " | ".join(part for part in (repr(text), phi, nlls, f"label {label}") if part)
    return f'<span style="{style}" title="{html.escape(tooltip)}">{html.escape(shown)}</span>'


def render_html(rows: pd.DataFrame, tokenizer, prefixes: list[str], summary_text: str, title: str) -> str:
    """A self-contained page: legend, summary, and each sample document with tokens coloured by Φ.

    Window k > 0 starts with n_context tokens repeated from window k − 1; they are skipped so each
    document reads once. Without a tokenizer, text between stored token spans is shown uncoloured. Token
    text is HTML-escaped; the tooltip shows the token, Φ, NLLs and label.
    """
    frame = token_frame(rows, tokenizer=tokenizer)
    n_context = rows.set_index("id")["n_context"]
    frame = frame[(frame["window"] == 0) | (frame["position"] >= frame["id"].map(n_context).to_numpy())]
    targets = frame["weight"][frame["loss_mask"]]
    scale = max(1.0, float(np.abs(targets).max()) if len(targets) else 1.0)  # full colour at |Φ| ≥ scale
    texts = rows.set_index("id")["text"]
    documents = []
    for doc_id, tokens in frame.groupby("doc_id", sort=False):
        parts, previous_end = [], 0
        for token in tokens.to_dict("records"):
            shown = token["token"] if isinstance(token["token"], str) else f"[{token['input_id']}]"
            if tokenizer is None and token["char_start"] >= 0:
                start, end, text = token["char_start"], token["char_end"], texts[token["id"]]
                # Stored spans may leave out a token's whitespace (offset trimming): show the gap as plain text.
                if start > previous_end:
                    parts.append(html.escape(text[previous_end:start]))
                # Byte-level pieces of one character share its span: show the character once.
                shown = text[max(start, min(previous_end, end)) : end]
                previous_end = max(end, previous_end)
            parts.append(_token_span(token, shown, prefixes, scale))
        documents.append(f"<h3>{html.escape(str(doc_id))}</h3>\n<div class=\"doc\">{''.join(parts)}</div>")
    swatches = [(-scale, phi_colour(-scale, scale)), (-scale / 2, phi_colour(-scale / 2, scale)), (0.0, ZERO_COLOUR),
                (scale / 2, phi_colour(scale / 2, scale)), (scale, phi_colour(scale, scale))]
    legend = "".join(f'<span class="swatch" style="background:{colour}">Φ {phi:+.3g}</span>' for phi, colour in swatches)
    legend += '<span class="swatch" style="color:#999">not a target</span>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 72em; }}
.doc {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.8; border: 1px solid #ddd; padding: .8em; }}
.doc span {{ border-radius: 2px; }}
.doc span:empty {{ padding-left: 3px; }}
.swatch {{ display: inline-block; padding: 0 .6em; margin-right: .4em; font-family: ui-monospace, monospace; }}
pre {{ background: #f6f6f6; padding: .8em; overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Background of each target token: red for Φ &lt; 0, grey for Φ = 0, blue for Φ &gt; 0, stronger with |Φ| (full at {scale:.3g}).
Hover a token for its text, Φ, NLL and label.</p>
<p>{legend}</p>
<h2>Summary</h2>
<pre>{html.escape(summary_text)}</pre>
<h2>Sample documents</h2>
{chr(10).join(documents)}
</body></html>
"""


def write_phi_png(tally: Tally, path: Path) -> None:
    """Histogram of Φ over trainable tokens (matplotlib's Agg canvas, no global backend switch), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    occupied = np.nonzero(tally.phi_counts)[0]
    if len(occupied):
        # Bin b spans [edges[b], edges[b + 1]); the open end bins are closed at the smallest / largest value.
        edges = np.concatenate([[min(tally.phi_low[occupied[0]], PHI_EDGES[0])], PHI_EDGES, [max(tally.phi_high[occupied[-1]], PHI_EDGES[-1]) + 0.01]])
        first, last = occupied[0], occupied[-1] + 1
        group = max(1, math.ceil((last - first) / 100))  # at most about 100 bars of equal width
        last = min(first + group * math.ceil((last - first) / group), N_BINS)
        starts = np.arange(first, last, group)
        ax.stairs(np.add.reduceat(tally.phi_counts[first:last], starts - first), np.append(edges[starts], edges[last]), fill=True, color="#1f77b4")
        ax.axvline(0.0, color="#888", linewidth=0.8)
    ax.set_xlabel("Φ")
    ax.set_ylabel("trainable tokens")
    ax.set_title(f"Φ over {tally.targets:,} trainable tokens")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


# ----------------------------------------------------------------------------------------------
# The job


def inspect_shards(cfg: InspectConfig) -> dict:
    """Summarise a shard folder (returned as a dict); write the HTML page and PNG histogram when asked.

    Summary: documents (rows with window 0), rows, tokens, trainable tokens (loss_mask), Φ over trainable
    tokens (min, quantiles, max, mean, share of zero and of negative Φ), per label its tokens, trainable
    tokens and mean Φ, per model prefix the mean NLL and entropy over trainable tokens (nats), and the
    shards' `tokenprio` metadata.
    """
    # ---- checks before reading anything large
    problems = validate(cfg)
    if problems:
        raise ValueError("\n".join(problems))
    source = open_shards(cfg.shards)
    prefixes = source.stat_prefixes
    columns = ["window", "n_tokens", "loss_mask", "weight", "label"] + [f"{p}_{s}" for p in prefixes for s in ("logprob", "entropy")]

    # ---- one streaming pass: row group by row group, needed columns only
    tally = Tally()
    for path in tqdm(source.paths, desc="inspect", unit="shard", file=sys.stderr):
        read_metadata(path)  # schema version check
        parquet = pq.ParquetFile(path)
        for i in range(parquet.num_row_groups):
            add_row_group(tally, parquet.read_row_group(i, columns=columns), prefixes, f"{path} row group {i}")
    summary = summarise(tally, source, prefixes)

    # ---- optional views
    if cfg.html is not None:
        tokenizer = None
        if cfg.tokenizer is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        page = render_html(sample_rows(source, cfg.samples), tokenizer, prefixes, format_summary(summary), f"tokenprio inspect: {source.folder}")
        write_text_atomic(Path(cfg.html), page)
    if cfg.png is not None:
        write_phi_png(tally, Path(cfg.png))
    return summary
