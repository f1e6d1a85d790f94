"""scoring.projection alone: hand-made tokenisations of known texts, against hand-computed values and invariants.

Run: pytest tests/test_projection.py
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.projection import PHI_REDUCE, ProjectionError, Tokenisation, aligned_intervals, project


def side(text: str, spans: list[tuple[int, int]], target: list[bool], segments=None) -> Tokenisation:
    """One record: tokens with character spans ((-1, -1) = none) and targets; one segment over the whole text."""
    segments = segments or [("text", 0, len(text))]
    return Tokenisation(
        texts=[text], names=["doc"], token_offsets=np.array([0, len(spans)]), char_start=np.array([s for s, _ in spans], dtype=np.int64),
        char_end=np.array([e for _, e in spans], dtype=np.int64), target=np.array(target, dtype=bool),
        segment_offsets=np.array([0, len(segments)]), segment_end=np.array([e for _, _, e in segments], dtype=np.int64),
    )


def run(ref: Tokenisation, student: Tokenisation, logprob, entropy=None, phi=None, phi_reduce="mean", ref_segments=None, student_segments=None):
    ref_segments = ref_segments or [("text", 0, len(ref.texts[0]))]
    student_segments = student_segments or [("text", 0, len(student.texts[0]))]
    alignment = aligned_intervals(ref.texts, [ref_segments], student.texts, [student_segments], ["doc"])
    logprob = np.asarray(logprob, dtype=np.float64)
    entropy = np.asarray(entropy if entropy is not None else np.abs(logprob), dtype=np.float64)
    phi = np.asarray(phi if phi is not None else ref.target.astype(float), dtype=np.float64)
    none = {"ref": np.full(len(logprob), np.nan)}  # no repeated context in these one-window records
    return project(ref, student, alignment, {"ref": logprob}, {"ref": entropy}, phi, phi_reduce, context_logprob=none, context_entropy=none)


TEXT = "The cat sat."  # 12 characters
NAN = np.nan


def test_hand_computed_split_and_merge():
    # reference: BOS | "The" | " cat" | " sat." | EOS ; student: BOS | "Th" | "e c" | "at" | " sat" | "." | EOS
    ref = side(TEXT, [(-1, -1), (0, 3), (3, 7), (7, 12), (-1, -1)], [False, False, True, True, True])
    student = side(TEXT, [(-1, -1), (0, 2), (2, 5), (5, 7), (7, 11), (11, 12), (-1, -1)], [False] + [True] * 6)
    out = run(ref, student, [NAN, -3.0, -2.0, -5.0, -0.5], entropy=[NAN, 1.0, 2.0, 4.0, 0.25])
    # "Th" lies in the non-target "The": not a target; "e c" takes 2 of the 4 characters of " cat" (only target mass).
    assert out.loss_mask.tolist() == [False, False, True, True, True, True, True]
    np.testing.assert_allclose(out.logprob["ref"][2:], [-2.0 * 2 / 4, -2.0 * 2 / 4, -5.0 * 4 / 5, -5.0 / 5, -0.5])
    np.testing.assert_allclose(out.logprob["ref"][1], -3.0 * 2 / 3)  # a non-target: every overlapping token with a value
    # entropy of "e c" (a target): the overlap-weighted mean over the reference targets it overlaps (" c" of " cat")
    np.testing.assert_allclose(out.entropy["ref"][2:], [2.0, 2.0, 4.0, 4.0, 0.25])
    assert np.isnan(out.logprob["ref"][0])  # BOS: the reference's BOS has no statistic
    assert out.lost_target_logprob["ref"] == pytest.approx(0.0, abs=1e-12)
    assert out.dropped_student_targets == 1 and out.lost_reference_targets == 0  # "Th": the student's own target, no reference target


def test_same_tokenisation_is_the_identity_even_where_tokens_split_a_character():
    # Two tokens share character 4 (a byte-level split of one multi-byte character).
    text = "ab c😀d"
    spans = [(-1, -1), (0, 2), (2, 4), (4, 5), (4, 6), (-1, -1)]
    ref = side(text, spans, [False, True, True, True, True, True])
    rng = np.random.default_rng(0)
    logprob, entropy, phi = -rng.uniform(0, 5, 6), rng.uniform(0, 3, 6), np.array([0, 1.5, -1.0, 0.25, 2.0, 1.0])
    logprob[0] = entropy[0] = NAN
    for reduce in PHI_REDUCE:
        out = run(ref, ref, logprob, entropy, phi, reduce)
        assert out.loss_mask.tolist() == ref.target.tolist()
        np.testing.assert_array_equal(out.phi, phi)
        np.testing.assert_allclose(out.logprob["ref"], logprob, rtol=1e-12)
        np.testing.assert_allclose(out.entropy["ref"], entropy, rtol=1e-12)


def test_a_shared_character_is_split_between_unequal_covers():
    text = "x😀"
    ref = side(text, [(0, 1), (1, 2), (1, 2)], [False, True, True])  # two reference tokens split the emoji
    student = side(text, [(0, 1), (1, 2)], [False, True])  # one student token holds it whole
    out = run(ref, student, [NAN, -1.0, -2.0])
    np.testing.assert_allclose(out.logprob["ref"], [NAN, -3.0])
    back = run(student, ref, [NAN, -3.0])  # and back: each of the two takes half
    np.testing.assert_allclose(back.logprob["ref"], [NAN, -1.5, -1.5])


@pytest.mark.parametrize("reduce,expected", [("mean", -1.0), ("min", -1.0), ("max", -1.0)])
def test_a_token_overlapping_a_negative_reference_token_stays_negative(reduce, expected):
    ref = side("abcd", [(-1, -1), (0, 2), (2, 4)], [False, True, True])
    student = side("abcd", [(-1, -1), (0, 4)], [False, True])
    out = run(ref, student, [NAN, -1.0, -1.0], phi=[0.0, 3.0, -1.0], phi_reduce=reduce)
    assert out.phi[1] == expected  # the positive 3.0 never outweighs the unlearned half


def test_phi_reduces_over_negatives_and_over_positives():
    ref = side("abcdef", [(-1, -1), (0, 2), (2, 3), (3, 6)], [False, True, True, True])
    student = side("abcdef", [(-1, -1), (0, 6)], [False, True])
    negatives = {r: run(ref, student, [NAN, -1, -1, -1], phi=[0, -1.0, 2.0, -0.5], phi_reduce=r).phi[1] for r in PHI_REDUCE}
    assert negatives == {"mean": pytest.approx((2 * -1.0 + 3 * -0.5) / 5), "min": -1.0, "max": -0.5}
    positives = {r: run(ref, student, [NAN, -1, -1, -1], phi=[0, 1.0, 2.0, 0.5], phi_reduce=r).phi[1] for r in PHI_REDUCE}
    assert positives == {"mean": pytest.approx((2 * 1.0 + 2.0 + 3 * 0.5) / 6), "min": 0.5, "max": 2.0}


def test_tokens_without_characters_match_by_gap_and_class():
    # The student's EOS takes the reference's EOS; a student without BOS simply has none.
    ref = side("ab", [(-1, -1), (0, 1), (1, 2), (-1, -1)], [False, True, True, True])
    student = side("ab", [(0, 2), (-1, -1)], [False, True])
    out = run(ref, student, [NAN, -1.0, -2.0, -0.75], entropy=[NAN, 1.0, 1.0, 0.5], phi=[0, 1, 1, 2.0])
    assert out.loss_mask.tolist() == [False, True]
    np.testing.assert_allclose([out.logprob["ref"][1], out.entropy["ref"][1], out.phi[1]], [-0.75, 0.5, 2.0])
    assert out.lost_reference_targets == 2  # "a" and "b" sit in the student's position 0, which predicts nothing
    assert out.lost_target_logprob["ref"] == pytest.approx(-3.0)


def test_template_text_that_differs_matches_within_its_turn():
    # Reference "<u>hi</u><a>yo</a>" vs student "[U] hi[/U][A] yo[/A]": contents align, template text does not.
    ref_text, student_text = "<u>hi</u><a>yo</a>", "[U] hi[/U][A] yo[/A]"
    ref_segments, student_segments = [("user", 3, 5), ("assistant", 12, 14)], [("user", 4, 6), ("assistant", 14, 16)]
    ref = side(ref_text, [(0, 3), (3, 5), (5, 9), (9, 12), (12, 14), (14, 18)], [False, False, False, False, True, True], ref_segments)
    student = side(student_text, [(0, 4), (4, 6), (6, 10), (10, 14), (14, 15), (15, 16), (16, 20)],
                   [False, False, False, False, True, True, True], student_segments)
    out = run(ref, student, [NAN, -1.0, -2.0, -3.0, -4.0, -0.5], phi=[0, 0, 0, 0, 1.0, 1.0],
              ref_segments=ref_segments, student_segments=student_segments)
    assert out.loss_mask.tolist() == [False, False, False, False, True, True, True]  # "[A] " stays a non-target header
    np.testing.assert_allclose(out.logprob["ref"][4:], [-2.0, -2.0, -0.5])  # "</a>" → "[/A]": the end of the same turn
    np.testing.assert_allclose(out.logprob["ref"][:4], [NAN, -1.0, -2.0, -3.0])  # headers and closers take their gap's non-targets


def test_a_character_the_student_does_not_cover_is_an_error():
    ref = side("a b", [(0, 1), (1, 2), (2, 3)], [False, True, True])
    student = side("a b", [(0, 1), (2, 3)], [False, True])  # the space is dropped (a whitespace pre-tokenizer)
    with pytest.raises(ProjectionError, match=r"doc: no student token covers character 1 \(' '\).*cannot reproduce the text"):
        run(ref, student, [NAN, -1.0, -1.0])


def partition(draw, start: int, end: int) -> list[tuple[int, int]]:
    """Random contiguous tokens covering characters [start, end)."""
    cuts = sorted(draw(st.sets(st.integers(start + 1, end - 1), max_size=end - start - 1))) if end - start > 1 else []
    bounds = [start] + cuts + [end]
    return list(zip(bounds[:-1], bounds[1:]))


@st.composite
def two_tokenisations(draw):
    n = draw(st.integers(2, 40))
    prompt = draw(st.integers(0, n - 1))  # characters [0, prompt) are a prompt (no targets)
    ref_spans = (partition(draw, 0, prompt) if prompt else []) + partition(draw, prompt, n)
    student_spans = (partition(draw, 0, prompt) if prompt else []) + partition(draw, prompt, n)
    logprob = draw(st.lists(st.floats(-20, 0), min_size=len(ref_spans) + 2, max_size=len(ref_spans) + 2))
    return n, prompt, ref_spans, student_spans, logprob


@settings(max_examples=200, deadline=None)
@given(two_tokenisations())
def test_target_logprob_is_conserved_for_any_two_partitions(case):
    n, prompt, ref_spans, student_spans, logprob = case
    text = "x" * n

    def with_bos_eos(spans):
        target = [False] + [start >= prompt for start, _ in spans] + [True]
        return side(text, [(-1, -1)] + spans + [(-1, -1)], target)

    ref, student = with_bos_eos(ref_spans), with_bos_eos(student_spans)
    out = run(ref, student, [NAN] + logprob[1:])
    expected = np.array([NAN] + logprob[1:])[ref.target].sum()
    assert out.logprob["ref"][out.loss_mask].sum() == pytest.approx(expected, abs=1e-9)
    assert out.lost_reference_targets == 0 and out.dropped_student_targets == 0
    # Characters are targets in the student exactly where they were in the reference.
    student_chars = {c for (s, e), m in zip(student_spans, out.loss_mask[1:-1]) if m for c in range(s, e)}
    assert student_chars == set(range(prompt, n))
