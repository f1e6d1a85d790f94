"""`tokenprio project` end to end: GPT-2 BPE shards scored by a tiny reference, projected onto the same tokenizer,
a character-level tokenizer and a second BPE trained in-process; conservation, labels, windows, Φ signs, chat
headers, training on projected shards, 1.0 shards and bad inputs.

Run: pytest tests/test_project.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import CHAT_TEMPLATE, build_model, data_path
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.project import ProjectConfig, project_shards
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.frames import write_shards
from scoring.projection import ProjectionError
from scoring.shards import MANIFEST_NAME, RECORD_FIELDS, ShardError, build_manifest, open_shards, read_table, write_json_atomic, write_shard_file
from training.train import TrainConfig, train

SPEC = "entropy(direction=down, alpha=1, max_nats=8) * labels(toxic=-1)"  # continuous positive Φ, negative on the toxic spans
STUDENT_TEMPLATE = (  # a Llama-3-like template without generation markers: headers differ from ChatML's
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
)
STUDENT_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def gsm8k_records(n: int = 36) -> list[dict]:
    """Text, prompt/completion and chat records from GSM8K, every other record with a `toxic` span."""
    rows = [json.loads(line) for line in data_path("gsm8k", "train.jsonl").read_text().splitlines()[:n]]
    records = []
    for i, row in enumerate(rows):
        q, a, toxic = row["question"], row["answer"], i % 2 == 1
        if i % 3 == 0:
            records.append({"id": f"t{i}", "text": q + "\n" + a, "spans": [{"start": 3, "end": 17, "label": "toxic"}] if toxic else []})
        elif i % 3 == 1:
            records.append({"id": f"c{i}", "prompt": q + "\n", "completion": a, "spans": [{"start": 0, "end": 12, "label": "toxic"}] if toxic else []})
        else:
            messages = [{"role": "system", "content": "You are a careful tutor."}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
            spans = [{"message": 2, "start": 5, "end": 20, "label": "toxic"}] if toxic else []
            records.append({"id": f"m{i}", "messages": messages, "spans": spans})
    return records


def char_tokenizer(texts: list[str], *, lowercase: bool = False, drop: str = "") -> PreTrainedTokenizerFast:
    """One token per character (every character of `texts` except `drop`), BOS by the post-processor, EOS, chat specials."""
    specials = ["<s>", "</s>", "<pad>", "<unk>"] + STUDENT_SPECIALS
    chars = sorted({c for text in texts for c in text} - set(drop))
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=STUDENT_SPECIALS)


def second_bpe(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the corpus, digits split one by one (GPT-2 groups them), no BOS."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["</s>", "<pad>"] + STUDENT_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", additional_special_tokens=STUDENT_SPECIALS)


def corpus_texts(records) -> list[str]:
    return [json.dumps(r, ensure_ascii=False) for r in records] + [CHAT_TEMPLATE, STUDENT_TEMPLATE, "\n\n"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """GPT-2 shards of the records scored by a tiny reference (with Φ from SPEC), and the student tokenizers."""
    root = tmp_path_factory.mktemp("project")
    records = gsm8k_records()
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "chatml.jinja").write_text(CHAT_TEMPLATE)
    (root / "student.jinja").write_text(STUDENT_TEMPLATE)
    gpt2 = AutoTokenizer.from_pretrained(data_path("gpt2-tokenizer"))
    build_model(len(gpt2), hidden_size=64, layers=1).save_pretrained(root / "ref")
    gpt2.save_pretrained(root / "ref")
    score(ScoreConfig(inputs=(str(root / "corpus.jsonl"),), out=str(root / "gpt2"), scorer=ScorerConfig(model=str(root / "ref"), batch_tokens=2048),
                      priority=SPEC, chat_template=str(root / "chatml.jinja"), max_length=96, n_context=16, records_per_shard=12))
    char_tokenizer(corpus_texts(records)).save_pretrained(root / "char")
    second_bpe(corpus_texts(records)).save_pretrained(root / "bpe2")
    return root


def projected(work: Path, student: str, name: str, **options) -> Path:
    out = work / name
    if not out.exists():
        options = {"chat_template": str(work / "chatml.jinja")} | options
        project_shards(ProjectConfig(shards=str(work / "gpt2"), tokenizer=str(work / student), out=str(out), **options))
    return out


def documents(folder: Path) -> dict[str, pd.DataFrame]:
    df = pd.read_parquet(folder)
    return {doc_id: rows.sort_values("window") for doc_id, rows in df.groupby("doc_id", sort=False)}


def target_logprob(rows: pd.DataFrame) -> float:
    return float(sum(np.asarray(r.ref_logprob, np.float64)[np.asarray(r.loss_mask)].sum() for r in rows.itertuples()))


def target_marks(rows: pd.DataFrame) -> np.ndarray:
    """(len(text),) int: how many tokens with loss_mask cover each character, over all rows of a record."""
    marks = np.zeros(len(rows.text.iloc[0]), dtype=np.int64)
    for r in rows.itertuples():
        for s, e, m in zip(r.char_start, r.char_end, r.loss_mask):
            if m and s >= 0:
                marks[s:e] += 1
    return marks


# ----------------------------------------------------------------------------------------------
# The contract: what scoring stores, and the identity


def test_scored_shards_record_how_each_text_was_built(work):
    df = pd.read_parquet(work / "gpt2")
    assert {f.name for f in RECORD_FIELDS} <= set(df.columns) and open_shards(work / "gpt2").metadata["schema_version"] == "1.1"
    for row in df[df.window == 0].itertuples():
        segments = [(s["role"], s["start"], s["end"]) for s in row.segments]
        if row.record_kind == "text":
            assert segments == [("text", 0, len(row.text))]
        elif row.record_kind == "completion":
            assert segments[0][0] == "prompt" and segments[1] == ("completion", segments[0][2], len(row.text))
        else:
            assert [s[0] for s in segments] == ["system", "user", "assistant"] and row.text[segments[0][1]:segments[0][2]] == "You are a careful tutor."
        for span in row.label_spans:  # absolute offsets into text, on characters the span names
            assert 0 <= span["start"] < span["end"] <= len(row.text) and span["label"] == "toxic"


@pytest.fixture(scope="module")
def bos_shards(work, model_dir) -> Path:
    """The records scored by the conftest reference: a BPE whose post-processor adds BOS, ChatML specials, {% generation %} markers."""
    out = work / "bos"
    score(ScoreConfig(inputs=(str(work / "corpus.jsonl"),), out=str(out), scorer=ScorerConfig(model=str(model_dir), batch_tokens=4096),
                      priority=SPEC, max_length=128, n_context=16, records_per_shard=12))
    return out


@pytest.mark.parametrize("reference", ["gpt2", "bos"])
def test_projecting_onto_the_same_tokenizer_reproduces_the_shards(work, request, reference):
    shards = work / "gpt2" if reference == "gpt2" else request.getfixturevalue("bos_shards")
    tokenizer = open_shards(shards).metadata["tokenizer"]["name"]  # the reference's own tokenizer folder
    out = work / f"same-{reference}"
    window = open_shards(shards).metadata["windowing"]
    project_shards(ProjectConfig(shards=str(shards), tokenizer=tokenizer, out=str(out), max_length=window["max_length"], n_context=window["n_context"],
                                 chat_template=str(work / "chatml.jinja") if reference == "gpt2" else None))
    source, same = pd.read_parquet(shards), pd.read_parquet(out)
    assert source.n_tokens.max() > 50 and (source.window > 0).any()  # longer than GPT-2's saved truncation (50): nothing was cut
    assert list(same.columns) == list(source.columns) and same.id.tolist() == source.id.tolist()
    for name in ["doc_id", "window", "n_context", "n_tokens", "n_targets", "text", "record_kind"]:
        assert same[name].tolist() == source[name].tolist(), name
    for a, b in zip(source.itertuples(), same.itertuples()):
        for name in ["input_ids", "loss_mask", "char_start", "char_end", "weight"]:
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)  # Φ exactly
        assert list(b.label) == list(a.label) and list(b.segments) == list(a.segments) and list(b.label_spans) == list(a.label_spans)
        for name in ["ref_logprob", "ref_entropy"]:
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-6, rtol=0, err_msg=name)
    meta = open_shards(out).metadata
    source_meta = open_shards(shards).metadata
    assert meta["tokenizer"]["fingerprint"] == source_meta["tokenizer"]["fingerprint"] and meta["models"] == source_meta["models"]
    assert meta["projection"]["source"]["manifest_checksum"] == open_shards(shards).manifest["checksum"]
    assert meta["projection"]["source"]["tokenizer"] == source_meta["tokenizer"] and meta["projection"]["phi_reduce"] == "mean"


# ----------------------------------------------------------------------------------------------
# Another tokenizer: conservation, labels, windows, Φ


@pytest.mark.parametrize("student", ["char", "bpe2"])
def test_target_logprob_is_conserved_per_document(work, student):
    out = projected(work, student, f"to-{student}", max_length=40, n_context=8)
    source, target = documents(work / "gpt2"), documents(out)
    assert source.keys() == target.keys()
    differences = [abs(target_logprob(target[d]) - target_logprob(source[d])) for d in source]
    assert max(differences) < 1e-4, max(differences)
    assert sum(len(rows) for rows in target.values()) > sum(len(rows) for rows in source.values())  # re-windowed for 40 tokens
    carried = open_shards(out).manifest["projected_from"]["carried"]
    assert carried["lost_reference_targets"] == 0 and abs(carried["lost_target_logprob"]["ref"]) < 1e-3


@pytest.mark.parametrize("student", ["char", "bpe2"])
def test_targets_and_labels_stay_on_their_characters_across_windows(work, student):
    out = projected(work, student, f"to-{student}", max_length=40, n_context=8)
    source, target = documents(work / "gpt2"), documents(out)
    for doc_id, rows in target.items():
        src = source[doc_id]
        if rows.record_kind.iloc[0] == "chat":
            continue  # same template, other offsets; the chat test below checks chat characters
        assert rows.text.iloc[0] == src.text.iloc[0]
        # No target character lost or counted twice: the windows' targets cover the reference's target characters once
        # (a character split by a byte-level tokenizer is covered by each of its pieces, within one row).
        counts, reference = target_marks(rows), target_marks(src)
        assert np.array_equal(counts > 0, reference > 0), doc_id
        if student == "char":
            assert counts.max() == 1
        # Every labelled character stays labelled, and a label reaches no token outside the spans.
        toxic = np.zeros(len(rows.text.iloc[0]), bool)
        for span in rows.label_spans.iloc[0]:
            toxic[span["start"]:span["end"]] = True
        for r in rows.itertuples():
            for s, e, label in zip(r.char_start, r.char_end, r.label):
                if s >= 0 and e > s:
                    assert (label == "toxic") == bool(toxic[s:e].any()), (doc_id, s, e)


@pytest.mark.parametrize("reduce", ["mean", "min", "max"])
def test_a_negative_phi_span_stays_negative_under_every_reduce(work, reduce):
    out = projected(work, "bpe2", f"reduce-{reduce}", max_length=40, n_context=8, phi_reduce=reduce)
    source, target = documents(work / "gpt2"), documents(out)
    negatives = 0
    for doc_id, rows in target.items():
        if rows.record_kind.iloc[0] == "chat":
            continue
        src = source[doc_id]
        unlearned = np.zeros(len(src.text.iloc[0]), bool)  # characters of reference targets with Φ < 0
        for r in src.itertuples():
            for s, e, m, w in zip(r.char_start, r.char_end, r.loss_mask, r.weight):
                if m and w < 0 and s >= 0:
                    unlearned[s:e] = True
        for r in rows.itertuples():
            for s, e, m, w in zip(r.char_start, r.char_end, r.loss_mask, r.weight):
                if m and s >= 0 and unlearned[s:e].any():
                    assert w < 0, (doc_id, s, e, w)
                    negatives += 1
                elif m:
                    assert w >= 0
    assert negatives > 20


def test_phi_reduces_are_ordered(work):
    frames = {r: pd.read_parquet(projected(work, "bpe2", f"reduce-{r}", max_length=40, n_context=8, phi_reduce=r)) for r in ("mean", "min", "max")}
    low, mean, high = (np.concatenate(frames[r].weight.to_numpy()) for r in ("min", "mean", "max"))
    assert (low <= mean + 1e-6).all() and (mean <= high + 1e-6).all() and (low < high).any()


def test_chat_headers_stay_out_of_the_targets_under_the_students_template(work):
    out = projected(work, "char", "chat-llama", chat_template=str(work / "student.jinja"), max_length=4096, n_context=8)
    source, target = documents(work / "gpt2"), documents(out)
    chats = [d for d, rows in target.items() if rows.record_kind.iloc[0] == "chat"]
    assert len(chats) == 12
    for doc_id in chats:
        (row,) = target[doc_id].itertuples()  # one window each at 4096 tokens
        assert row.text.startswith("<|start_header_id|>system<|end_header_id|>\n\nYou are a careful tutor.<|eot_id|>")
        content = next(s for s in row.segments if s["role"] == "assistant")
        pieces = [row.text[s:e] for s, e, m in zip(row.char_start, row.char_end, row.loss_mask) if m]
        assert "".join(pieces) == row.text[content["start"]:content["end"]] + "<|eot_id|>"  # content and its end-of-turn only
        assert abs(target_logprob(target[doc_id]) - target_logprob(source[doc_id])) < 1e-4  # <|im_end|>'s pieces → <|eot_id|>


def test_a_student_trains_from_projected_shards(work, tmp_path):
    out = projected(work, "bpe2", "to-bpe2", max_length=40, n_context=8)
    tokenizer = AutoTokenizer.from_pretrained(work / "bpe2")
    student = tmp_path / "student"
    build_model(len(tokenizer), seed=1, hidden_size=64, layers=1).save_pretrained(student)
    tokenizer.save_pretrained(student)
    with pytest.raises(ValueError, match=r"tokenizer fingerprints differ.*`tokenprio project .*--tokenizer .*--out NEW`"):
        train(TrainConfig(shards=work / "gpt2", model=student, out=tmp_path / "refused", steps=1))
    for spec in ("stored", "rho1(k=0.6)"):
        run = tmp_path / spec.replace("(", "-").replace(")", "").replace("=", "")
        final = train(TrainConfig(shards=out, model=student, out=run, priority=spec, batch_tokens=400, steps=3))
        assert final.name == "checkpoint-000003"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 3 and all(np.isfinite(m["loss"]) and m["targets"] > 0 for m in metrics)
        if spec == "stored":
            assert sum(m["negative_tokens"] for m in metrics) > 0  # the projected toxic spans are unlearned
        else:
            assert all(abs(m["selected_share"] - 0.6) < 0.02 for m in metrics)  # ⌈0.6·N⌉ by the projected ref_logprob


def test_projected_shards_take_reweight_inspect_and_a_second_model(work, tmp_path):
    from pipelines.add_model import AddModelConfig, add_model
    from pipelines.inspect_shards import InspectConfig, inspect_shards
    from pipelines.reweight import ReweightConfig, reweight

    out = projected(work, "bpe2", "to-bpe2", max_length=40, n_context=8)
    reweight(ReweightConfig(shards=str(out), priority="highpass(min_nll=16)", out=str(tmp_path / "rw")))
    rw = pd.read_parquet(tmp_path / "rw")
    for r in rw.itertuples():  # Φ from the projected ref_logprob, 0 off the mask even where a statistic is NaN there
        expected = (np.asarray(r.loss_mask) & (-np.nan_to_num(np.asarray(r.ref_logprob), nan=0.0) > 16)).astype(np.float32)
        np.testing.assert_array_equal(r.weight, expected)
    summary = inspect_shards(InspectConfig(shards=out))
    assert summary["trainable_tokens"] == open_shards(out).manifest["totals"]["targets"] and summary["documents"] == 36
    assert np.isfinite(summary["models"]["ref"]["mean_nll"]) and summary["phi"]["negative_share"] > 0
    base = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(work / "bpe2")
    build_model(len(tokenizer), seed=2, hidden_size=64, layers=1).save_pretrained(base)
    tokenizer.save_pretrained(base)
    add_model(AddModelConfig(shards=str(out), scorer=ScorerConfig(model=str(base), batch_tokens=2048), prefix="base", out=str(tmp_path / "both")))
    both = pd.read_parquet(tmp_path / "both")
    assert all(np.isfinite(np.asarray(r.base_logprob)[1:]).all() for r in both.itertuples())


# ----------------------------------------------------------------------------------------------
# Schema 1.0 shards and bad inputs: a named error, and no output


def as_schema_1_0(folder: Path, out: Path) -> Path:
    """The same shards as schema 1.0 wrote them: no record columns, version 1.0."""
    source = open_shards(folder)
    entries = []
    for index, path in enumerate(source.paths):
        table = read_table(path)
        metadata = json.loads(table.schema.metadata[b"tokenprio"]) | {"schema_version": "1.0"}
        table = table.drop_columns([f.name for f in RECORD_FIELDS]).replace_schema_metadata({b"tokenprio": json.dumps(metadata).encode()})
        entries.append(write_shard_file(table, out, index))
    write_json_atomic(out / MANIFEST_NAME, build_manifest(entries, source.metadata) | {"schema_version": "1.0"})
    return out


def test_schema_1_0_text_and_completion_shards_project_like_1_1(work, tmp_path):
    df = pd.read_parquet(work / "gpt2")
    plain = tmp_path / "plain"
    write_shards(df[df.record_kind != "chat"], like=work / "gpt2", out=plain)
    old = as_schema_1_0(plain, tmp_path / "old")
    new_out, old_out = tmp_path / "new-bpe2", tmp_path / "old-bpe2"
    for folder, out in ((plain, new_out), (old, old_out)):
        project_shards(ProjectConfig(shards=str(folder), tokenizer=str(work / "bpe2"), out=str(out), max_length=40, n_context=8))
    new, from_old = pd.read_parquet(new_out), pd.read_parquet(old_out)
    assert from_old.id.tolist() == new.id.tolist()
    for a, b in zip(new.itertuples(), from_old.itertuples()):
        for name in ["input_ids", "loss_mask", "weight", "ref_logprob", "ref_entropy"]:
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
        # 1.0 keeps no spans: labelled tokens' characters stand for them, so labels can only grow.
        assert all(old_label == "toxic" for new_label, old_label in zip(a.label, b.label) if new_label == "toxic")
    with pytest.raises(ShardError, match=r"schema-1.0 record without an appended EOS.*chat records cannot be projected"):
        project_shards(ProjectConfig(shards=str(as_schema_1_0(work / "gpt2", tmp_path / "old-chat")), tokenizer=str(work / "bpe2"),
                                     out=str(tmp_path / "x"), chat_template=str(work / "chatml.jinja")))
    assert not (tmp_path / "x").exists()


def edited(work: Path, out: Path, **columns) -> Path:
    df = pd.read_parquet(work / "gpt2")
    for name, value in columns.items():
        df[name] = [value(row) for row in df.itertuples()]
    write_shards(df, like=work / "gpt2", out=out)
    return out


@pytest.mark.parametrize("case,error,match", [
    ("no_text", ShardError, r"part-00000\.parquet: row 0 \(doc t0\) has no `text`.*tokenprio score"),
    ("no_offsets", ShardError, r"row 0 \(doc t0\): no token has a character span.*cannot be projected"),
    ("unknown_token", ProjectionError, r"part-00001\.parquet, row \d+ \(doc \w+\): the student tokenizer maps 'q' .*unknown token '<unk>'"),
    ("lowercase", ProjectionError, r"part-00000\.parquet, row 0 \(doc t0\): the student's tokens decode to 'natalia.*changes characters"),
    ("drops_whitespace", ProjectionError, r"row 0 \(doc t0\): .*cannot reproduce the text"),
])
def test_bad_inputs_get_a_named_error_and_no_output(work, tmp_path, case, error, match):
    records, shards, tokenizer = gsm8k_records(), work / "gpt2", work / "char"
    if case == "no_text":
        shards = edited(work, tmp_path / "src", text=lambda row: None)
    elif case == "no_offsets":
        shards = edited(work, tmp_path / "src", char_start=lambda row: [-1] * row.n_tokens, char_end=lambda row: [-1] * row.n_tokens)
    elif case == "unknown_token":  # "q" first appears in the second shard: shard 0 is written, then everything is removed
        assert "q" not in "".join(corpus_texts(records[:12])[:12]) and "q" in "".join(corpus_texts(records[12:])[:-3])
        tokenizer = tmp_path / "tok"
        char_tokenizer(corpus_texts(records), drop="q").save_pretrained(tokenizer)
    elif case == "lowercase":
        tokenizer = tmp_path / "tok"
        char_tokenizer(corpus_texts(records), lowercase=True).save_pretrained(tokenizer)
    else:
        tokenizer = tmp_path / "tok"
        tok = char_tokenizer(corpus_texts(records))
        split = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), split])  # spaces dropped
        tok.save_pretrained(tokenizer)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        project_shards(ProjectConfig(shards=str(shards), tokenizer=str(tokenizer), out=str(out), chat_template=str(work / "chatml.jinja")))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_projects_and_refuses_a_used_folder(work, tmp_path):
    out = tmp_path / "cli"
    args = ["project", str(work / "gpt2"), "--tokenizer", str(work / "bpe2"), "--out", str(out), "--chat-template", str(work / "chatml.jinja")]
    result = CliRunner().invoke(app, args + ["--max-length", "64", "--context", "8", "--phi-reduce", "min"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "projection: " in result.output
    config = json.loads((out / MANIFEST_NAME).read_text())["config"]
    assert (config["max_length"], config["n_context"], config["phi_reduce"]) == (64, 8, "min")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "exists and is not an empty folder" in again.output
    bad = CliRunner().invoke(app, ["project", str(work / "gpt2"), "--tokenizer", str(work / "bpe2"), "--out", str(tmp_path / "b"), "--phi-reduce", "median"])
    assert bad.exit_code == 1 and "--phi-reduce 'median'" in bad.output and not (tmp_path / "b").exists()


def test_arrow_record_types_are_the_contract():
    names = {f.name: f.type for f in RECORD_FIELDS}
    assert names["record_kind"] == pa.string()
    assert names["segments"] == pa.list_(pa.struct([("role", pa.string()), ("start", pa.int32()), ("end", pa.int32())]))
    assert names["label_spans"] == pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("label", pa.string())]))
