"""Hugging Face transformers scoring backend: reference statistics for windows of token ids.

The forward pass stops at the final hidden states; `scoring.stats.token_stats` applies the output layer
in float32 chunks, so no (B, T, V) logits tensor is ever built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scoring.devices import dtype_name
from scoring.stats import check_head_matches_logits, chunk_rows_for_budget, final_hidden, token_stats

def check_model_path(model: str) -> None:
    """A local path that does not exist is an error now, before anything loads."""
    # Hub ids are `name` or `org/name`; anything else (absolute, relative, deeper) names a local folder.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(
            f"--model {model}: no such model folder. Give a local Hugging Face model folder (config.json + "
            "safetensors) or a hub id of the form org/name that is in the local cache."
        )


def load_hf_model(model: str, *, revision: str | None, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """Load a causal LM for scoring (eval mode, safetensors only) and check its head reproduces its logits."""
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise FileNotFoundError(f"--model {model}: could not load a safetensors causal LM ({error}).") from error
    lm = lm.to(device).eval()
    check_head_matches_logits(lm, device)
    return lm


def batches_by_tokens(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group window indices, sorted by length, into batches whose padded size B × T_max ≤ batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        grown = max(longest, lengths[i])
        if current and grown * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def score_windows_hf(
    model, windows: list[list[int]], *, device: torch.device, batch_tokens: int, logits_budget_bytes: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reference statistics for each window of token ids.

    Returns, per window, (logprob, entropy): float32 arrays of the window's length in nats; position 0 is
    NaN (nothing predicts the first token) and position t holds log p(x_t | x_<t) and H(p(· | x_<t)).
    Windows are batched by length with right padding; a window's result does not depend on its batch.
    """
    vocab_size = model.get_output_embeddings().weight.shape[0]
    chunk_rows = chunk_rows_for_budget(vocab_size, logits_budget_bytes)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(windows)
    pad_id = 0
    for batch in batches_by_tokens([len(w) for w in windows], batch_tokens):
        lengths = torch.tensor([len(windows[i]) for i in batch])
        input_ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : lengths[row]] = torch.tensor(windows[i])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        hidden = final_hidden(model, input_ids.to(device), attention_mask.to(device))  # (B, T, D)
        # Position t-1 predicts token t: keep t in [1, length) of each row.
        predicts = attention_mask[:, 1:].bool()  # (B, T-1)
        targets = input_ids[:, 1:][predicts].to(device)  # (N,)
        logprob, entropy = token_stats(model, hidden[:, :-1][predicts.to(device)], targets, chunk_rows=chunk_rows)
        logprob, entropy = logprob.float().cpu().numpy(), entropy.float().cpu().numpy()
        start = 0
        for row, i in enumerate(batch):
            n = int(lengths[row]) - 1
            lp = np.full(n + 1, np.nan, dtype=np.float32)
            ent = np.full(n + 1, np.nan, dtype=np.float32)
            lp[1:], ent[1:] = logprob[start : start + n], entropy[start : start + n]
            results[i] = (lp, ent)
            start += n
    return results  # type: ignore[return-value]


def hf_model_info(model_name: str, revision: str | None, dtype: torch.dtype) -> dict:
    import transformers

    return {
        "name": model_name,
        "revision": revision,
        "dtype": dtype_name(dtype),
        "backend": "hf",
        "backend_version": transformers.__version__,
        "entropy": "exact",
    }
