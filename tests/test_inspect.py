"""`tokenprio inspect` on hand-made shards: every summary number against hand values, HTML colours and
escaping, a valid PNG, and the CLI's output and exit codes.

Run: .venv/bin/pytest -q tests/test_inspect.py
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_frames import METADATA, ROWS, write_hand_shards
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.inspect_shards import InspectConfig, Tally, add_row_group, histogram_quantile, inspect_shards
from scoring.shards import ShardError

# Trainable Φ of the hand rows: a:0 [1, -1, 0.5], b:0 [0, 2], b:1 [-0.5].
PHI = np.array([1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
SPAN = re.compile(r'<span style="([^"]*)" title="([^"]*)">([^<]*)</span>')
RED, BLUE, GREY, OFF = "background:rgba(214,39,40,{})", "background:rgba(31,119,180,{})", "background:rgb(200,200,200)", "color:#999"


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_hand_shards(tmp_path / "shards")


def test_summary_matches_hand_values(shards):
    summary = inspect_shards(InspectConfig(shards=shards))
    assert (summary["shards"], summary["documents"], summary["rows"], summary["tokens"], summary["trainable_tokens"]) == (2, 2, 3, 10, 6)
    phi = summary["phi"]
    assert (phi["min"], phi["p01"], phi["p10"], phi["p50"], phi["p90"], phi["p99"], phi["max"]) == (-1.0, -1.0, -1.0, 0.0, 2.0, 2.0, 2.0)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        assert phi[f"p{round(q * 100):02d}"] == np.quantile(PHI, q, method="inverted_cdf")
    assert phi["mean"] == pytest.approx(2.0 / 6, rel=1e-12)
    assert phi["zero_share"] == pytest.approx(1 / 6) and phi["negative_share"] == pytest.approx(2 / 6)
    assert summary["labels"] == {
        "code": {"tokens": 1, "trainable_tokens": 1, "mean_phi": 2.0},
        "toxic": {"tokens": 2, "trainable_tokens": 2, "mean_phi": -0.5},
    }
    # Means over the six targets: NLL = -logprob, entropy as stored (0.1 is stored as float32).
    ref_entropy = (1.5 + 2.5 + 0.25 + 0.5 + 2.0 + float(np.float32(0.1))) / 6
    assert summary["models"]["ref"]["mean_nll"] == pytest.approx((1 + 2 + 0.5 + 3 + 4 + 1.25) / 6, rel=1e-12)
    assert summary["models"]["ref"]["mean_entropy"] == pytest.approx(ref_entropy, rel=1e-12)
    assert summary["models"]["base"] == {"mean_nll": pytest.approx(8.5 / 6, rel=1e-12), "mean_entropy": pytest.approx(7.5 / 6, rel=1e-12)}
    assert summary["metadata"] == METADATA  # the first file's per-shard facts are left out


def test_unscored_shards_have_no_models(tmp_path):
    rows = [{k: v for k, v in row.items() if not k.startswith(("ref_", "base_"))} for row in ROWS]
    summary = inspect_shards(InspectConfig(shards=write_hand_shards(tmp_path / "s", rows=rows, prefixes=[])))
    assert summary["models"] == {} and summary["trainable_tokens"] == 6


def test_streamed_quantiles_are_within_one_bin_of_numpy():
    rng = np.random.default_rng(0)
    tally, values = Tally(), []
    for _ in range(3):  # three row groups of 50 rows x 40 tokens
        weight = np.concatenate([rng.normal(0, 2, 1990), [-15.0, 12.5] * 5]).astype(np.float32)
        mask = rng.random(2000) < 0.8
        weight[~mask] = 0
        values.append(weight[mask].astype(np.float64))
        offsets = pa.array(np.arange(0, 2001, 40, dtype=np.int32))
        table = pa.table({
            "window": np.zeros(50, np.int32), "n_tokens": np.full(50, 40, np.int32),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(mask)),
            "weight": pa.ListArray.from_arrays(offsets, pa.array(weight)),
            "label": pa.ListArray.from_arrays(offsets, pa.nulls(2000, pa.string())),
        })
        add_row_group(tally, table, [], "test")
    values = np.concatenate(values)
    assert tally.targets == len(values) and tally.documents == 150
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        expected = np.quantile(values, q, method="inverted_cdf")
        assert abs(histogram_quantile(tally.phi_counts, tally.phi_low, tally.phi_high, q) - expected) <= 0.01, q
    assert histogram_quantile(tally.phi_counts, tally.phi_low, tally.phi_high, 0.0) == values.min() == -15.0
    assert histogram_quantile(tally.phi_counts, tally.phi_low, tally.phi_high, 1.0) == values.max() == 12.5
    assert tally.phi_sum / tally.targets == pytest.approx(values.mean(), rel=1e-9)


def test_html_escapes_tokens_and_colours_them_by_phi(shards, tmp_path):
    page_path = tmp_path / "view.html"
    inspect_shards(InspectConfig(shards=shards, html=page_path))
    page = page_path.read_text()
    # Colour scale: full at max |Φ| = 2, opacity 0.2 + 0.8·|Φ|/2. Doc b's window 1 repeats "x" as context: shown once.
    assert [(style, text) for style, _, text in SPAN.findall(page)] == [
        (OFF, "[1]"), (BLUE.format("0.60"), "Hi"), (RED.format("0.60"), " &lt;b&gt;"), (BLUE.format("0.40"), "!"),
        (OFF, "[1]"), (GREY, "Ünï"), (OFF, " 😀"), (BLUE.format("1.00"), "x"), (RED.format("0.40"), " yz"),
    ]
    assert "<b>" not in page
    tooltip = html.unescape(SPAN.findall(page)[2][1])
    assert tooltip == "' <b>' | Φ -1 | ref NLL 2.000 | base NLL 1.000 | label toxic"
    assert not list(tmp_path.glob(".*.tmp"))


def test_html_shows_trimmed_whitespace_once_and_shared_character_spans_once(tmp_path):
    # Offsets trimmed the space before "é"; two byte-level pieces of "é" share its span [2, 3).
    row = {
        "id": "c:0", "doc_id": "c", "window": 0, "n_context": 0, "n_tokens": 5, "n_targets": 4,
        "input_ids": [1, 30, 31, 32, 33], "loss_mask": [False, True, True, True, True], "weight": [0.0, 1.0, 1.0, 1.0, 1.0],
        "label": [None] * 5, "text": "a é!", "char_start": [-1, 0, 2, 2, 3], "char_end": [-1, 1, 3, 3, 4],
    }
    page_path = tmp_path / "view.html"
    inspect_shards(InspectConfig(shards=write_hand_shards(tmp_path / "s", rows=[row], shard_rows=((0,),), prefixes=()), html=page_path))
    body = re.search(r'<div class="doc">(.*?)</div>', page_path.read_text(), re.S).group(1)
    assert [text for _, _, text in SPAN.findall(body)] == ["[1]", "a", "é", "", "!"]
    assert html.unescape(re.sub(r"<[^>]+>", "", body)) == "[1]a é!"


def test_html_samples_and_tokenizer_decoding(shards, tmp_path, tokenizer_dir, tokenizer):
    page_path = tmp_path / "view.html"
    inspect_shards(InspectConfig(shards=shards, html=page_path, samples=1, tokenizer=tokenizer_dir))
    texts = [text for _, _, text in SPAN.findall(page_path.read_text())]
    assert texts == [html.escape(tokenizer.decode([i])) for i in ROWS[0]["input_ids"]]  # only document a


def test_png_is_a_valid_png_file(shards, tmp_path):
    png = tmp_path / "phi.png"
    inspect_shards(InspectConfig(shards=shards, png=png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_options_are_refused_together(shards, tmp_path):
    cfg = InspectConfig(shards=shards, samples=0, html=tmp_path / "missing" / "x.html", tokenizer=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"(?s)--samples 0.*--tokenizer .*nope: no such.*--html .*does not exist"):
        inspect_shards(cfg)
    with pytest.raises(ShardError, match="no such shard folder"):
        inspect_shards(InspectConfig(shards=tmp_path / "absent"))


def test_cli_prints_the_summary_and_exits_1_on_errors(shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(shards), "--html", str(tmp_path / "v.html"), "--png", str(tmp_path / "v.png"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert "documents  2   rows 3   tokens 10   trainable 6 (60.0%)" in result.stdout
    assert re.search(r"toxic\s+2\s+2\s+-0.5", result.stdout) and re.search(r"ref\s+1.958\s+1.142", result.stdout)
    assert (tmp_path / "v.html").exists() and (tmp_path / "v.png").exists()

    result = runner.invoke(app, ["inspect", str(tmp_path / "absent")])
    assert result.exit_code == 1 and "no such shard folder" in result.output
    result = runner.invoke(app, ["inspect", str(shards), "--samples", "0"])
    assert result.exit_code == 1 and "--samples 0: show at least 1 document" in result.output
