"""eval scores an OpenAI-compatible embeddings endpoint: embtune's own server on 127.0.0.1 must score exactly what
the same model scores in-process; batches are cached on disk; 429/5xx are retried, 400 is not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embtune.config import ConfigError
from embtune.eval.endpoint import EndpointEncoder, EndpointFailed, parse_spec
from embtune.eval.run import run as run_eval
from embtune.llm.config import LLMConfig
from embtune.schema import load_config
from embtune.sections.serve import ServeConfig
from embtune.serve.app import create_app
from embtune.serve.bundle import build_bundle
from tests.conftest import uvicorn_in_thread
from tests.fake_openai_server import FakeOpenAIServer, fake_embedding


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def embtune_server(tiny_model_dir, tmp_path_factory):
    """serve.app on 127.0.0.1 over the tiny model; yields (base_url, app)."""
    bundle = build_bundle(tiny_model_dir, None, tmp_path_factory.mktemp("bundle") / "export", device="cpu")
    app = create_app(bundle, ServeConfig(model_name="tiny", max_wait_ms=2, cache_size=0, max_inputs=512))
    with uvicorn_in_thread(app) as url:
        yield f"{url}/v1", app


@pytest.mark.slow
def test_served_model_scores_like_the_local_model_and_is_cached(tmp_path, tiny_beir, tiny_model_dir, embtune_server):
    base_url, app = embtune_server
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={tiny_beir}", f"train.base_model={tiny_model_dir}",
                 "eval.compare_bm25=false", "eval.dims=[16]", "eval.endpoint_batch_size=7",
                 f"eval.extra_models={{served: 'openai:tiny@{base_url}'}}"]
    run_eval(load_config(None, overrides))
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"]
    base, served = results["base"], results["served"]
    for metric in ("ndcg@10", "recall@10", "map@100", "mrr@10"):
        assert served[metric] == pytest.approx(base[metric], abs=1e-9), metric
    assert served["dims"]["16"]["ndcg@10"] == pytest.approx(base["dims"]["16"]["ndcg@10"], abs=1e-9)
    assert served["endpoint"]["http_requests"] == served["endpoint"]["batches"] > 1  # batched, no retries
    assert served["endpoint"]["cached_batches"] == 0

    texts_before = app.state.batcher.texts
    run_eval(load_config(None, overrides), force=True)
    again = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"]["served"]
    assert app.state.batcher.texts == texts_before  # the corpus and queries came from the disk cache
    assert again["endpoint"]["http_requests"] == 0
    assert again["ndcg@10"] == served["ndcg@10"]


def test_retries_429_and_500_then_succeeds():
    with FakeOpenAIServer(fault="429", fault_times=2) as server:
        encoder = EndpointEncoder("fake-embed", server.base_url, batch_size=2, use_cache=False,
                                  retry=LLMConfig(backoff_base_s=0.01))
        rows = encoder.encode(["a", "b", "c"])
        server.set_fault("500", 1)
        encoder.encode(["d"])
    expected = np.asarray([fake_embedding(t) for t in "abc"], dtype=np.float32)
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    assert encoder.stats.retries == 3 and encoder.stats.http_requests == 3 + 3  # 3 batches + 3 retries


def test_gives_up_after_max_attempts_and_names_the_reason():
    with FakeOpenAIServer(fault="500") as server:
        retry = LLMConfig(backoff_base_s=0.01, max_attempts=3)
        encoder = EndpointEncoder("fake-embed", server.base_url, use_cache=False, retry=retry)
        with pytest.raises(EndpointFailed, match="500 Internal Server Error after 3 attempts"):
            encoder.encode(["a"])
        assert server.embedding_requests == 3


@pytest.mark.slow
def test_bad_request_is_not_retried(embtune_server):
    base_url, _ = embtune_server
    encoder = EndpointEncoder("tiny", base_url, use_cache=False)
    with pytest.raises(EndpointFailed, match="400 Bad Request"):
        encoder.encode(["x " * 5000])  # over the model's token limit: the server refuses it by name
    assert encoder.stats.http_requests == 1


def test_spec_parsing_and_config_errors(monkeypatch, tiny_beir):
    assert parse_spec("openai:text-embedding-3-small") == ("text-embedding-3-small", None)
    assert parse_spec("openai:m@http://127.0.0.1:9/v1") == ("m", "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="names no model"):
        load_config(None, [f"data.path={tiny_beir}", "eval.extra_models={te3: 'openai:'}"])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="needs OPENAI_API_KEY"):
        EndpointEncoder.from_spec("openai:text-embedding-3-small")
