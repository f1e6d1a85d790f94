"""The `vllm-server` backend: reference statistics from a running vLLM OpenAI-compatible server (`vllm serve`).

Same contract as the other backends (scoring/backends.py): per window of token ids, (logprob, entropy)
float32 arrays of its length, position 0 NaN, position t about token t, nats. Each window is one request

    POST {url}/v1/completions  {"model": NAME, "prompt": [ids], "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
    → choices[0].prompt_logprobs = [null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]

(`prompt_logprobs` is vLLM's extra parameter; a token-id prompt is never re-tokenised). Position t holds
the target x_t's log-prob, exact, and the top k log-probs of p(· | x_<t): the target's entry is one of
them when it ranks in the top k, else the (k+1)-th entry. The entropy is the top-k estimate of
`scoring.vllm_backend.topk_entropy` over the server's vocabulary (an upper bound; recorded as `top-k`).

`connect` checks the server before anything is scored, each failure a ServerError naming the URL:
GET /v1/models serves NAME with max_model_len ≥ the windows + 1 (the one sampled token); POST /tokenize
of a probe text gives exactly the ids the local tokenizer gives; the server accepts the tokenizer's
largest id, and the largest id it accepts (found by probing) is the vocabulary V of the entropy estimate;
a probe completion returns k log-probs per position (k ≤ the server's --max-logprobs).

Requests run concurrently on a thread pool (the server batches them). Connection errors, timeouts and
HTTP 5xx are retried with exponential backoff (SERVER_RETRIES, SERVER_BACKOFF_S); then, or at once for
4xx, ServerError names the URL and the fix. Complete shards are kept, so a rerun resumes.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from scoring.vllm_backend import topk_entropy

SERVER_CONCURRENCY = 8  # requests in flight
SERVER_TOPK = 20  # vLLM's default --max-logprobs: the widest top-k a default server returns
SERVER_RETRIES = 4  # retries of a request after a connection error, timeout or 5xx
SERVER_BACKOFF_S = 0.5  # first retry delay; doubles each retry (0.5 + 1 + 2 + 4 = 7.5 s in all)
REQUEST_TIMEOUT_S = 600  # one window on a busy server
PROBE_TIMEOUT_S = 60
PROBE_TEXT = "The quick brown fox, 1234 + 5678 = 6912.\n\tdef f(x): return x ** 2  # Grüße, 東京 🙂"
LARGEST_ID = 2**31 - 1  # token ids are int32 in the shards


class ServerError(ValueError):
    """The server cannot score what was asked: unreachable, another model or tokenizer, or a refused request."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # HTTP status of a refused request, None when there was no answer


@dataclass(frozen=True)
class Server:
    """A checked server and how it scores."""

    url: str  # base URL, no trailing slash
    model: str  # served model name
    version: str  # the server's vLLM version (GET /version)
    max_model_len: int  # tokens per request, the sampled one included
    vocab_size: int  # V of the top-k entropy estimate: the largest token id the server accepts, plus one
    topk: int  # log-probs per position


# ----------------------------------------------------------------------------------------------
# HTTP with retries


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's own message for a refused request (vLLM: {"error": {"message": ...}})."""
    body = error.read().decode("utf-8", "replace")
    try:
        detail = json.loads(body)
        return str(detail.get("error", {}).get("message") or detail.get("message") or detail.get("detail") or body)
    except (json.JSONDecodeError, AttributeError):
        return body.strip()[:500] or error.reason


def request_json(url: str, body: dict | None = None, *, timeout: float = PROBE_TIMEOUT_S, retries: int = SERVER_RETRIES) -> dict:
    """GET (body None) or POST `body` as JSON to `url`; the decoded answer.

    Connection errors, timeouts and 5xx are retried `retries` times with exponential backoff; 4xx raise
    ServerError(status) at once; no answer after the retries raises ServerError(status None).
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise ServerError(f"{url}: HTTP {error.code}: {_error_message(error)}", status=error.code) from None
            problem = f"HTTP {error.code}: {_error_message(error)}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            problem = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        if attempt < retries:
            time.sleep(SERVER_BACKOFF_S * 2**attempt)
    raise ServerError(
        f"{url}: no answer after {retries + 1} attempts ({problem}). Is the vLLM server running and reachable there? "
        "Start it (`vllm serve MODEL`) or fix --server-url; shards already written are kept, so rerun the same command once it is up."
    )


# ----------------------------------------------------------------------------------------------
# Checks before scoring


def _served_model(url: str, model: str) -> dict:
    served = request_json(f"{url}/v1/models").get("data", [])
    for card in served:
        if card.get("id") == model:
            return card
    names = [card.get("id") for card in served]
    raise ServerError(f"{url}: serves {names}, not --model {model!r}. Pass the served name as --model, or point --server-url at the server of {model}.")


def _check_tokenizer(url: str, model: str, tokenizer) -> None:
    """The server tokenises a probe text into exactly the local tokenizer's ids (same vocabulary, merges, special-token rule)."""
    local = tokenizer(PROBE_TEXT)["input_ids"]
    try:
        served = request_json(f"{url}/tokenize", {"model": model, "prompt": PROBE_TEXT})["tokens"]
    except ServerError as error:
        if error.status is None:
            raise
        raise ServerError(f"{url}: POST /tokenize failed ({error}); the tokenizer check needs it (`vllm serve` without --skip-tokenizer-init).") from None
    if list(served) != list(local):
        raise ServerError(
            f"{url}: model {model!r} tokenises a probe text into other ids than --tokenizer {tokenizer.name_or_path!r} "
            f"(server {served[:8]}..., local {local[:8]}...): it serves another tokenizer. Use the served model's tokenizer."
        )


def _accepts_token(url: str, model: str, token_id: int) -> bool:
    """Whether the server takes `token_id` in a prompt (vLLM refuses ids beyond its tokenizer and model vocabularies)."""
    try:
        request_json(f"{url}/v1/completions", {"model": model, "prompt": [token_id], "max_tokens": 1, "temperature": 0})
        return True
    except ServerError as error:
        if error.status == 400 and "out of vocabulary" in str(error):
            return False
        raise


def _vocab_size(url: str, model: str, tokenizer) -> int:
    """The largest id the server accepts, plus one: max(tokenizer, model vocabulary), at least len(tokenizer)."""
    lo = len(tokenizer) - 1
    if not _accepts_token(url, model, lo):
        raise ServerError(f"{url}: model {model!r} refuses token id {lo}, the largest of --tokenizer {tokenizer.name_or_path!r}: "
                          "its vocabulary is smaller, so it serves another tokenizer. Use the served model's tokenizer.")
    step, hi = 1, lo + 1
    while _accepts_token(url, model, hi):  # gallop to a refused id, then bisect
        lo, step = hi, step * 2
        hi = lo + step
        if hi > LARGEST_ID:
            raise ServerError(f"{url}: accepts every token id, so it cannot check them (started with --skip-tokenizer-init?); "
                              "restart `vllm serve` with its tokenizer.")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _accepts_token(url, model, mid) else (lo, mid)
    return lo + 1


def connect(url: str, model: str, tokenizer, *, max_length: int, topk: int = SERVER_TOPK) -> Server:
    """Check the server at `url` (module docstring) for windows of at most `max_length` tokens; ServerError names what fails."""
    url = url.rstrip("/")
    card = _served_model(url, model)
    max_model_len = int(card.get("max_model_len") or 0)
    if max_model_len < max_length + 1:
        raise ServerError(f"{url}: model {model!r} takes {max_model_len} tokens per request; windows of --max-length {max_length} "
                          f"need {max_length + 1} (one sampled token). Lower --max-length or restart the server with --max-model-len {max_length + 1}.")
    _check_tokenizer(url, model, tokenizer)
    vocab_size = _vocab_size(url, model, tokenizer)
    version = request_json(f"{url}/version").get("version", "unknown")
    server = Server(url=url, model=model, version=version, max_model_len=max_model_len, vocab_size=vocab_size, topk=topk)
    probe = tokenizer(PROBE_TEXT)["input_ids"][: max_length - 1] + [len(tokenizer) - 1]
    try:
        logprob, entropy = score_window(server, probe)
    except ServerError as error:
        if error.status != 400:
            raise
        raise ServerError(f"{error}. If the server allows fewer log-probs per position, pass a smaller --server-topk, "
                          f"or restart it with --max-logprobs {topk}.") from None
    if not (np.isfinite(logprob[1:]).all() and np.isfinite(entropy[1:]).all()):
        raise ServerError(f"{url}: a probe window returned non-finite log-probs; check the served model.")
    return server


# ----------------------------------------------------------------------------------------------
# Scoring


def window_stats(window: list[int], positions: list, topk: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(logprob, entropy) of one window from its `prompt_logprobs` (position 0 null, then {id: {"logprob", ...}})."""
    n = len(window)
    logprob = np.full(n, np.nan, dtype=np.float32)
    entropy = np.full(n, np.nan, dtype=np.float32)
    top = np.empty((n - 1, topk), dtype=np.float64)  # (n-1, k) top-k log-probs per position
    for t in range(1, n):
        entries, target = positions[t], str(window[t])
        logprob[t] = entries[target]["logprob"]
        # k entries: the target is among the top k; k + 1: it is the extra one.
        values = [e["logprob"] for key, e in entries.items() if len(entries) == topk or key != target]
        if len(values) != topk:
            raise ServerError(f"position {t} came back with {len(entries)} log-probs for a top-{topk} request.")
        top[t - 1] = values
    if n > 1:
        entropy[1:] = topk_entropy(top, vocab_size)
    return logprob, entropy


def score_window(server: Server, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    body = {"model": server.model, "prompt": list(map(int, window)), "max_tokens": 1, "temperature": 0, "prompt_logprobs": server.topk}
    answer = request_json(f"{server.url}/v1/completions", body, timeout=REQUEST_TIMEOUT_S)
    positions = answer["choices"][0].get("prompt_logprobs")
    if positions is None or len(positions) != len(window):
        raise ServerError(f"{server.url}: a {len(window)}-token prompt came back with {len(positions or [])} prompt log-prob positions; "
                          "is this a vLLM server (prompt_logprobs is vLLM's extra parameter)?")
    try:
        return window_stats(window, positions, server.topk, server.vocab_size)
    except ServerError as error:
        raise ServerError(f"{server.url}: {error}") from None


def score_windows_server(server: Server, windows: list[list[int]], pool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window, (logprob, entropy) float32 arrays of its length, scored by `server` with up to the pool's requests in flight."""
    for index, window in enumerate(windows):
        if not 1 <= len(window) < server.max_model_len:
            raise ValueError(f"window {index} has {len(window)} tokens; {server.url} scores 1 to {server.max_model_len - 1} per request.")
    return list(pool.map(lambda window: score_window(server, window), windows))


def server_model_info(server: Server) -> dict:
    """The shard metadata's `models[prefix]` entry (the dtype is the server's own and not reported by its API)."""
    return {"name": server.model, "revision": None, "dtype": None, "backend": "vllm-server", "backend_version": server.version,
            "entropy": "top-k", "topk": server.topk}
