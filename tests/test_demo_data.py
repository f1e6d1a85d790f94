"""The demo data generator: deterministic bytes, honoured defect rates, exact spans, a character tokenizer.

Run: .venv/bin/pytest -q tests/test_demo_data.py
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pipelines.demo.data import (
    BOILERPLATE,
    IMPATIENT_STYLE,
    NOISE_ALPHABET,
    PROMPT_STYLES,
    TOXIC_PHRASE,
    DemoDataConfig,
    build_splits,
    build_tokenizer,
    column_steps,
    generate,
    operands,
    parse_answer,
    render_response,
)

SMALL = dict(n_clean=50, n_train=3000, n_valid=30, n_test=40)


def problem_of(record) -> tuple[int, int]:
    return operands(record["messages"][0]["content"])


def strip_spans(content: str, spans: list[dict]) -> str:
    for span in sorted(spans, key=lambda s: -s["start"]):
        content = content[: span["start"]] + content[span["end"] :]
    return content


def within(observed: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_same_config_writes_same_bytes(tmp_path):
    a = generate(DemoDataConfig(out_dir=tmp_path / "a", **SMALL))
    b = generate(DemoDataConfig(out_dir=tmp_path / "b", **SMALL))
    for name in ("clean", "train", "valid", "test"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    other = generate(DemoDataConfig(out_dir=tmp_path / "c", seed=1, **SMALL))
    assert other["train"].read_bytes() != a["train"].read_bytes()


def test_render_response_by_hand():
    text, stated, wrong = render_response(4821, 3967, 4, drop_carry_at_ten=False)
    assert text == BOILERPLATE + "1+7+0=8\n2+6+0=8\n8+9+0=17\n4+3+1=8\nAnswer: 8788"
    assert (stated, wrong) == (8788, [])
    # 9+1 = 10 in the ones column: the wrong rule writes carry 0 into the tens column.
    text, stated, wrong = render_response(4829, 3961, 4, drop_carry_at_ten=True)
    assert text == BOILERPLATE + "9+1+0=10\n2+6+0=8\n8+9+0=17\n4+3+1=8\nAnswer: 8780"
    assert stated == 8780 and [text[s:e] for s, e in wrong] == ["0"]
    assert text[wrong[0][0] - 4 : wrong[0][0] + 1] == "2+6+0"


def test_wrong_rule_never_in_last_column():
    steps, dropped = column_steps(5000, 5000, 4, drop_carry_at_ten=True)
    assert dropped == [] and steps[-1] == (0, 0, 1)


def test_splits_are_disjoint_and_clean_splits_are_correct():
    splits = build_splits(DemoDataConfig(out_dir=None, **SMALL))
    seen = [problem_of(r) for records in splits.values() for r in records]
    assert len(seen) == len(set(seen))
    for name in ("clean", "valid", "test"):
        for record in splits[name]:
            a, b = problem_of(record)
            assert record["answer"] == a + b
            assert parse_answer(record["messages"][1]["content"]) == a + b
            assert record["spans"] == []


def test_defect_rates_are_honoured():
    cfg = DemoDataConfig(out_dir=None, wrong_carry_rate=0.6, noise_rate=0.2, toxic_rate=0.5, **SMALL)
    train = build_splits(cfg)["train"]
    impatient = [r for r in train if r["messages"][0]["content"].startswith(PROMPT_STYLES[IMPATIENT_STYLE][:6])]
    toxic = [r for r in train if any(s["label"] == "toxic" for s in r["spans"])]
    assert all(r in impatient for r in toxic)
    assert within(len(toxic), len(impatient), cfg.toxic_rate)
    noisy = [r for r in train if any(s["label"] == "noise" for s in r["spans"])]
    assert within(len(noisy), len(train), cfg.noise_rate)
    # Records that can show the wrong rule: a column before the last sums to exactly 10.
    exposed = [r for r in train if column_steps(*problem_of(r), cfg.digits, drop_carry_at_ten=True)[1]]
    wrong = [r for r in train if any(s["label"] == "wrong_carry" for s in r["spans"])]
    assert all(r in exposed for r in wrong)
    assert within(len(wrong), len(exposed), cfg.wrong_carry_rate)
    clean_cfg = replace(cfg, wrong_carry_rate=0.0, noise_rate=0.0, toxic_rate=0.0)
    assert all(r["spans"] == [] for r in build_splits(clean_cfg)["train"])


def test_spans_point_exactly_at_the_defects():
    cfg = DemoDataConfig(out_dir=None, wrong_carry_rate=0.8, noise_rate=0.3, toxic_rate=0.7, **SMALL)
    for record in build_splits(cfg)["train"]:
        content = record["messages"][1]["content"]
        for span in record["spans"]:
            piece = content[span["start"] : span["end"]]
            assert span["message"] == 1
            if span["label"] == "toxic":
                assert piece == TOXIC_PHRASE and span["start"] == 0
            elif span["label"] == "wrong_carry":
                assert piece == "0"
            else:
                assert span["label"] == "noise" and 3 <= len(piece) <= 6 and set(piece) <= set(NOISE_ALPHABET)
        # Removing the toxic phrase and the noise leaves exactly the (possibly wrong-rule) worked answer.
        a, b = problem_of(record)
        drop = any(s["label"] == "wrong_carry" for s in record["spans"])
        expected, stated, _ = render_response(a, b, cfg.digits, drop)
        assert strip_spans(content, [s for s in record["spans"] if s["label"] != "wrong_carry"]) == expected
        assert record["stated"] == stated and (stated == a + b) != drop


def test_operands_of_every_prompt_style():
    assert [operands(style.format(a=305, b=97)) for style in PROMPT_STYLES] == [(305, 97)] * len(PROMPT_STYLES)
    with pytest.raises(ValueError, match="two operands"):
        operands("What is 1+2+3?")


def test_validate_names_the_field():
    with pytest.raises(ValueError, match="noise_rate=1.5"):
        generate(DemoDataConfig(out_dir=None, noise_rate=1.5))


def test_tokenizer_is_character_level_with_chat_masks():
    tok = build_tokenizer()
    text = BOILERPLATE + "9+1+0=10\nAnswer: 8780"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    messages = [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "Answer: 3"}]
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    targets = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(targets) == "Answer: 3<|end|>"
    assert len(tok) == 103
