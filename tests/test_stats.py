"""token_stats and the HF backend against float64 references; batch invariance. Run: pytest tests/test_stats.py"""

import numpy as np
import pytest
import torch
from conftest import build_model

from scoring.hf_backend import batches_by_tokens, score_windows_hf
from scoring.stats import check_head_matches_logits, chunk_rows_for_budget, final_hidden, token_stats

VOCAB = 320


def float64_reference(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """log p(x_t | x_<t) and entropy from the model's own logits, in float64 (position 0 NaN)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1]
    logprob = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    return torch.cat([nan, logprob]).numpy(), torch.cat([nan, entropy]).numpy()


@pytest.fixture(scope="module")
def model():
    return build_model(VOCAB, seed=3)


def random_windows(n: int, seed: int = 0, lo: int = 2, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_token_stats_matches_float64_reference(model, chunk_rows):
    ids = random_windows(1, seed=1, lo=30, hi=31)[0]
    with torch.no_grad():
        hidden = final_hidden(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, :-1]
        logprob, entropy = token_stats(model, hidden, torch.tensor(ids[1:]), chunk_rows=chunk_rows)
    ref_lp, ref_ent = float64_reference(model, ids)
    assert logprob.dtype == torch.float32 and entropy.dtype == torch.float32
    np.testing.assert_allclose(logprob.numpy(), ref_lp[1:], atol=2e-5, rtol=0)
    np.testing.assert_allclose(entropy.numpy(), ref_ent[1:], atol=2e-5, rtol=0)
    # The outputs are informative (not a uniform distribution), so the comparison can fail.
    assert ref_ent[1:].std() > 0.05


def test_token_stats_gradient_equals_direct_cross_entropy(model):
    ids = torch.tensor(random_windows(1, seed=2, lo=20, hi=21)[0])
    hidden = final_hidden(model, ids[None], torch.ones(1, len(ids), dtype=torch.long))[0, :-1]
    hidden_direct = hidden.detach().clone().requires_grad_(True)
    hidden_chunked = hidden.detach().clone().requires_grad_(True)
    logprob, _ = token_stats(model, hidden_chunked, ids[1:], chunk_rows=3)
    (-logprob.sum()).backward()
    direct = torch.nn.functional.cross_entropy(model.lm_head(hidden_direct).float(), ids[1:], reduction="sum")
    direct.backward()
    torch.testing.assert_close(hidden_chunked.grad, hidden_direct.grad, atol=1e-5, rtol=1e-5)


def test_chunk_rows_for_budget():
    assert chunk_rows_for_budget(50_257, 256 * 2**20) == 256 * 2**20 // (4 * 50_257)
    assert chunk_rows_for_budget(10**9, 1) == 1


def test_score_windows_matches_reference_and_is_batch_invariant(model):
    windows = random_windows(12, seed=4)
    batched = score_windows_hf(model, windows, device=torch.device("cpu"), batch_tokens=200, logits_budget_bytes=4 * VOCAB * 5)
    for window, (lp, ent) in zip(windows, batched):
        alone_lp, alone_ent = score_windows_hf(model, [window], device=torch.device("cpu"), batch_tokens=10_000, logits_budget_bytes=2**20)[0]
        ref_lp, ref_ent = float64_reference(model, window)
        assert lp.dtype == np.float32 and len(lp) == len(window) and np.isnan(lp[0]) and np.isnan(ent[0])
        np.testing.assert_allclose(lp[1:], alone_lp[1:], atol=1e-5, rtol=0)  # padded batch == alone
        np.testing.assert_allclose(ent[1:], alone_ent[1:], atol=1e-5, rtol=0)
        np.testing.assert_allclose(lp[1:], ref_lp[1:], atol=2e-5, rtol=0)
        np.testing.assert_allclose(ent[1:], ref_ent[1:], atol=2e-5, rtol=0)


def test_batches_respect_the_padded_token_budget():
    lengths = [5, 50, 7, 3, 20, 20, 1, 49]
    batches = batches_by_tokens(lengths, batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 60


def test_model_with_transformed_logits_is_refused(model):
    class ScaledLogits(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    scaled = ScaledLogits(model.config).eval()
    scaled.load_state_dict(model.state_dict())
    check_head_matches_logits(model, torch.device("cpu"))  # the plain model passes
    with pytest.raises(ValueError, match="soft-capping or scaling"):
        check_head_matches_logits(scaled, torch.device("cpu"))
