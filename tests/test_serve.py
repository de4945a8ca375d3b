"""serve: OpenAI-compatible embeddings, search, micro-batching, limits and auth, on a tiny offline model.

The embeddings are checked against ``SentenceTransformer.encode`` through the real ``openai`` client talking to a
real uvicorn server on 127.0.0.1; the rest goes through FastAPI's TestClient.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from sentence_transformers import CrossEncoder, SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

from embtune.dataio import document_text
from embtune.sections.serve import ServeConfig
from embtune.serve.__main__ import main
from embtune.serve.app import create_app
from embtune.serve.bundle import build_bundle
from tests.conftest import uvicorn_in_thread

API_KEY = "test-key"
WORDS = ("the a of and to in is for on with cat dog fish bird tree river mountain city house car train music "
         "paper retrieval embedding model search index query").split()
DOCS = [
    {"_id": "d1", "title": "Cats", "text": "the cat sat in the house", "lang": "en", "year": 2020},
    {"_id": "d2", "title": "Dogs", "text": "a dog ran to the river", "lang": "en", "year": 2021},
    {"_id": "d3", "title": "Fish", "text": "fish in the river and the mountain", "lang": "de", "year": 2021},
    {"_id": "d4", "title": "Trains", "text": "the train to the city", "lang": "de", "year": 2022},
    {"_id": "d5", "title": "Music", "text": "music for the car and the train", "lang": "fr", "year": 2020},
    {"_id": "d6", "title": "Search", "text": "an embedding model for retrieval and search", "lang": "en", "year": 2023},
    {"_id": "d7", "title": "Trees", "text": "a bird in the tree on the mountain", "lang": "fr", "year": 2022},
    {"_id": "d8", "title": "Paper", "text": "the paper on the index of the query", "lang": "de", "year": 2023},
]
TEXTS = ["the cat", "a dog in the river", "music for the train", "an embedding model", "bird"]


def _write_tiny_bert(folder, seed: int = 0, num_labels: int | None = None) -> None:
    """A 2-layer BERT with hidden size 32 and a 100-entry WordPiece vocabulary, randomly initialized (seeded)."""
    folder.mkdir(parents=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, **({"num_labels": num_labels}
                                                                               if num_labels else {}))
    model = BertForSequenceClassification(config) if num_labels else BertModel(config)
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    _write_tiny_bert(root / "hf")
    model = SentenceTransformer(modules=[Transformer(str(root / "hf")), Pooling(32, "mean"), Normalize()],
                                device="cpu")
    model.max_seq_length = 64
    model.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    return SentenceTransformer(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ce") / "model"
    _write_tiny_bert(folder, seed=1, num_labels=1)
    CrossEncoder(str(folder), device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="session")
def bundle_dir(tiny_model_dir, tmp_path_factory):
    return build_bundle(tiny_model_dir, DOCS, tmp_path_factory.mktemp("bundle") / "export", device="cpu")


@pytest.fixture(scope="session")
def live_server(bundle_dir):
    """A real uvicorn server on 127.0.0.1 with an API key; yields (base_url, app)."""
    # Admission bounds well above what the tests send at once (48 concurrent requests), so none is shed.
    app = create_app(bundle_dir, ServeConfig(api_key=API_KEY, max_wait_ms=20, model_name="tiny", max_queue=256,
                                             max_queue_wait_ms=30_000))
    with uvicorn_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(bundle_dir, cross_encoder_dir):
    cfg = ServeConfig(max_inputs=4, max_input_chars=200, max_input_tokens=16, max_k=5,
                      cross_encoder=str(cross_encoder_dir), rerank_candidates=4)
    with TestClient(create_app(bundle_dir, cfg)) as test_client:
        yield test_client


def _expected(reference_model, texts, dims=None):
    rows = reference_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)  # (n, dim)
    if dims:
        rows = rows[:, :dims] / np.linalg.norm(rows[:, :dims], axis=1, keepdims=True)
    return rows


# --- OpenAI compatibility, through the real client and a real server -------------------------------------------

@pytest.mark.slow
def test_openai_client_float_and_base64_match_encode(live_server, reference_model):
    base_url, _ = live_server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    expected = _expected(reference_model, TEXTS)

    as_float = client.embeddings.create(input=TEXTS, model="tiny", encoding_format="float")
    got = np.array([d.embedding for d in sorted(as_float.data, key=lambda d: d.index)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert as_float.model == "tiny"
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > len(TEXTS)

    # Without encoding_format the openai client asks for base64 and decodes it itself.
    as_default = client.embeddings.create(input=TEXTS, model="tiny")
    np.testing.assert_allclose(np.array([d.embedding for d in as_default.data]), expected, atol=1e-5)

    single = client.embeddings.create(input=TEXTS[0], model="tiny", encoding_format="float")
    assert len(single.data) == 1
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=1e-5)


def test_base64_is_little_endian_float32(client, reference_model):
    response = client.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in response.json()["data"]]
    np.testing.assert_allclose(np.stack(rows), _expected(reference_model, TEXTS[:2]), atol=1e-6)


@pytest.mark.slow
def test_dimensions_truncates_and_renormalizes(live_server, reference_model):
    base_url, _ = live_server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    response = client.embeddings.create(input=TEXTS, model="tiny", dimensions=8, encoding_format="float")
    got = np.array([d.embedding for d in response.data])  # (n, 8)
    assert got.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, _expected(reference_model, TEXTS, dims=8), atol=1e-5)


@pytest.mark.slow
def test_wrong_api_key_is_refused_by_openai_client(live_server):
    base_url, _ = live_server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.embeddings.create(input="the cat", model="tiny")


# --- micro-batching ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_microbatched_vectors_equal_unbatched(live_server, reference_model):
    """Concurrent single-text requests share forward passes and get exactly what one-at-a-time encoding gives."""
    base_url, app = live_server
    texts = [f"{a} {b} {c}" for a in WORDS[10:16] for b in WORDS[16:20] for c in ("house", "car")]  # 48 distinct
    batcher = app.state.batcher
    passes_before, requests_before = batcher.forward_passes, batcher.requests

    async def fire():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
            responses = await asyncio.gather(*[
                http.post("/v1/embeddings", json={"input": t, "encoding_format": "float"}) for t in texts])
        return responses

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    got = np.array([r.json()["data"][0]["embedding"] for r in responses])
    unbatched = np.stack([_expected(reference_model, [t])[0] for t in texts])  # one forward pass per text
    np.testing.assert_allclose(got, unbatched, atol=1e-5)
    passes = batcher.forward_passes - passes_before
    assert batcher.requests - requests_before == len(texts)
    assert passes < len(texts) / 2, f"{len(texts)} concurrent requests took {passes} forward passes"


def test_microbatch_off_is_one_request_per_pass(bundle_dir, reference_model):
    with TestClient(create_app(bundle_dir, ServeConfig(microbatch=False, cache_size=0, threads=1))) as client:
        for text in TEXTS:
            response = client.post("/v1/embeddings", json={"input": text, "encoding_format": "float"})
            np.testing.assert_allclose(response.json()["data"][0]["embedding"],
                                       _expected(reference_model, [text])[0], atol=1e-5)
        stats = client.get("/health").json()["batcher"]
    assert stats["forward_passes"] == stats["requests"] == len(TEXTS)


def test_cache_answers_repeated_text(bundle_dir):
    with TestClient(create_app(bundle_dir, ServeConfig(cache_size=8))) as client:
        first = client.post("/v1/embeddings", json={"input": ["the cat", "the cat"]}).json()
        second = client.post("/v1/embeddings", json={"input": "the cat"}).json()
        health = client.get("/health").json()
    assert first["data"][0]["embedding"] == first["data"][1]["embedding"] == second["data"][0]["embedding"]
    assert health["batcher"]["texts"] == 1  # encoded once: deduplicated in the request, cached for the next
    assert health["cache"]["hits"] == 1


# --- admission control ---------------------------------------------------------------------------------------

def test_requests_past_max_queue_get_503_with_retry_after_at_once(bundle_dir):
    """With max_queue requests in progress, the next ones are refused at once (not queued); /health shows the depth,
    and once the queue drains the server admits again."""
    import threading
    import time

    app = create_app(bundle_dir, ServeConfig(max_queue=2, max_queue_wait_ms=60_000, retry_after_s=3, cache_size=0))
    release = threading.Event()
    encode = app.state.batcher._encode

    def slow_encode(texts):  # the forward pass of the admitted requests holds until the test releases it
        release.wait(timeout=30)
        return encode(texts)

    app.state.batcher._encode = slow_encode

    async def fire(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            admitted = [asyncio.create_task(http.post("/v1/embeddings", json={"input": f"the cat {i}"}))
                        for i in range(2)]
            while (await http.get("/health")).json()["queue"]["in_flight"] < 2:
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            shed = await asyncio.gather(http.post("/search", json={"query": "the dog"}),
                                        http.post("/v1/embeddings", json={"input": "a fish"}))
            shed_seconds = time.perf_counter() - started
            health = (await http.get("/health")).json()
            release.set()
            done = await asyncio.gather(*admitted)
            after = await http.post("/v1/embeddings", json={"input": "a bird"})
            return shed, shed_seconds, health, done, after

    with uvicorn_in_thread(app) as base_url:
        shed, shed_seconds, health, done, after = asyncio.run(fire(base_url))
    for response in shed:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert "serve.max_queue" in response.json()["error"]["message"]
    assert shed_seconds < 5  # answered while the admitted ones still wait for their forward pass
    assert {k: health["queue"][k] for k in ("in_flight", "max_queue", "admitted", "shed_503", "shed_full")} == {
        "in_flight": 2, "max_queue": 2, "admitted": 2, "shed_503": 2, "shed_full": 2}
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200


def test_requests_are_refused_while_the_oldest_waits_longer_than_max_queue_wait(bundle_dir):
    """The second bound: with one request stuck in a forward pass and another waiting behind it longer than
    max_queue_wait_ms, new requests get 503 although max_queue is far off."""
    import threading
    import time

    app = create_app(bundle_dir, ServeConfig(max_queue=100, max_queue_wait_ms=200, cache_size=0, max_batch_size=1))
    release = threading.Event()
    encode = app.state.batcher._encode
    app.state.batcher._encode = lambda texts: (release.wait(timeout=30), encode(texts))[1]

    async def fire(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            stuck = [asyncio.create_task(http.post("/v1/embeddings", json={"input": f"the cat {i}"})) for i in range(2)]
            while (await http.get("/health")).json()["queue"]["in_flight"] < 2:
                await asyncio.sleep(0.01)
            time.sleep(0.3)  # the second request has now waited > 200 ms behind the stuck forward pass
            shed = await http.post("/v1/embeddings", json={"input": "a fish"})
            health = (await http.get("/health")).json()
            release.set()
            return shed, health, await asyncio.gather(*stuck)

    with uvicorn_in_thread(app) as base_url:
        shed, health, done = asyncio.run(fire(base_url))
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert "serve.max_queue_wait_ms" in shed.json()["error"]["message"]
    assert health["queue"]["shed_slow"] == 1 and health["queue"]["expected_wait_ms"] > 200
    assert [r.status_code for r in done] == [200, 200]


def test_expected_wait_counts_the_texts_queued_at_the_recent_cost():
    """A new request's expected wait is the queue ahead of it at the measured cost per text: 8 queued texts at about
    20 ms each behind a stuck pass read as about 160 ms, before any of them has waited that long."""
    import threading
    import time

    from embtune.serve.batcher import MicroBatcher

    release = threading.Event()

    def encode(texts):
        if texts[0] == "stuck":
            release.wait(timeout=30)
        time.sleep(0.02 * len(texts))
        return np.zeros((len(texts), 4), dtype=np.float32)

    async def scenario():
        batcher = MicroBatcher(encode, max_batch_size=4, max_wait_ms=0)
        await batcher.start()
        await batcher.encode(["a", "b", "c", "d"])  # measures ~20 ms per text
        stuck = asyncio.create_task(batcher.encode(["stuck"]))
        await asyncio.sleep(0.05)  # the stuck pass has started
        queued = [asyncio.create_task(batcher.encode([f"t{i}"])) for i in range(8)]
        await asyncio.sleep(0)
        expected, waited = batcher.expected_wait(), batcher.oldest_wait()
        release.set()
        await asyncio.gather(stuck, *queued)
        await batcher.stop()
        return expected, waited

    expected, waited = asyncio.run(scenario())
    assert waited < 0.05 and 0.12 < expected < 0.4


def test_keep_alive_timeout_reaches_uvicorn(bundle_dir, monkeypatch):
    import uvicorn

    from embtune.serve.app import run_server

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    run_server(ServeConfig(bundle_dir=str(bundle_dir), timeout_keep_alive=42))
    assert seen["timeout_keep_alive"] == 42


# --- bad input: 4xx with a message that names the problem --------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"input": []}, "must not be an empty list"),
    ({"input": ""}, "empty"),
    ({"input": ["the cat", "  "]}, "input[1] is empty"),
    ({"input": 123}, "must be a string or a list of strings, got int"),
    ({"input": {"text": "x"}}, "got dict"),
    ({"input": [1, 2, 3]}, "token ids is not supported"),
    ({"input": [[1, 2], [3]]}, "token ids is not supported"),
    ({"input": ["the cat", 5]}, "input[1] must be a string, got int"),
    ({"input": ["a", "b", "c", "d", "e"]}, "at most 4 per request (serve.max_inputs)"),
    ({"input": "x" * 201}, "201 characters; at most 200"),
    ({"input": "the cat " * 20}, "the model reads at most 16"),
    ({"model": "tiny"}, "'input' is required"),
    ({"input": "the cat", "dimensions": 0}, "'dimensions' must be between 1 and 32"),
    ({"input": "the cat", "dimensions": 33}, "'dimensions' must be between 1 and 32"),
    ({"input": "the cat", "dimensions": "8"}, "'dimensions' must be an integer, got str"),
    ({"input": "the cat", "dimensions": True}, "'dimensions' must be an integer, got bool"),
    ({"input": "the cat", "encoding_format": "int8"}, "'float' or 'base64'"),
    ({"input": "the cat", "model": 7}, "'model' must be a string"),
    ({"input": "the cat", "temperature": 1}, "unknown field(s) 'temperature'"),
])
def test_bad_embedding_requests_are_400_with_message(client, body, message):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
])
def test_malformed_body_is_400(client, content, message):
    response = client.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize("body, message", [
    ({"query": "the cat", "k": 0}, "'k' must be between 1 and 5"),
    ({"query": "the cat", "k": 6}, "'k' must be between 1 and 5"),
    ({"query": "the cat", "k": "3"}, "'k' must be an integer"),
    ({"query": ""}, "query is empty"),
    ({"k": 3}, "'query' must be a string, got null"),
    ({"query": "the cat", "filter": ["lang"]}, "'filter' must be an object"),
    ({"query": "the cat", "filter": {"color": "red"}}, "filter key 'color' is not a metadata field"),
    ({"query": "the cat", "filter": {"lang": ["en"]}}, "must be a string, number, boolean or null"),
    ({"query": "the cat", "hybrid": "yes"}, "'hybrid' must be true or false"),
    ({"query": "the cat", "top_k": 3}, "unknown field(s) 'top_k'"),
])
def test_bad_search_requests_are_400_with_message(client, body, message):
    response = client.post("/search", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_body_without_json_content_type_is_400_naming_the_header(client):
    """FastAPI reads a body as JSON only when the request says it is (a cross-site form post cannot pass as one)."""
    response = client.post("/v1/embeddings", content=b'{"input": "the cat"}', headers={"content-type": "text/plain"})
    assert response.status_code == 400
    assert "Content-Type: application/json" in response.json()["error"]["message"]


def test_rerank_without_cross_encoder_names_the_setting(bundle_dir):
    with TestClient(create_app(bundle_dir, ServeConfig())) as client:
        response = client.post("/search", json={"query": "the cat", "rerank": True})
    assert response.status_code == 400
    assert "serve.cross_encoder" in response.json()["error"]["message"]


# --- auth ----------------------------------------------------------------------------------------------------

def test_api_key_is_enforced(bundle_dir):
    with TestClient(create_app(bundle_dir, ServeConfig(api_key="s3cret"))) as client:
        assert client.post("/v1/embeddings", json={"input": "the cat"}).status_code == 401
        wrong = client.post("/search", json={"query": "the cat"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "API key" in wrong.json()["error"]["message"]
        ok = client.post("/v1/embeddings", json={"input": "the cat"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # liveness probes need no key


# --- search --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [{}, {"hybrid": True}])
def test_search_exact_text_returns_that_doc(client, mode):
    for doc in DOCS:
        response = client.post("/search", json={"query": document_text(doc), "k": 3, **mode})
        assert response.status_code == 200, response.text
        hits = response.json()["hits"]
        assert hits[0]["id"] == doc["_id"], (doc, hits)
        assert hits[0]["title"] == doc["title"] and hits[0]["text"] == doc["text"]
    top = client.post("/search", json={"query": document_text(DOCS[0]), "k": 1}).json()["hits"][0]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)  # cosine of a text with itself
    assert top["metadata"] == {"lang": "en", "year": 2020}


def test_search_filter_keeps_only_matching_docs(client):
    exact_en = document_text(DOCS[0])  # d1 is lang "en": with a "de" filter it must not come back
    response = client.post("/search", json={"query": exact_en, "k": 5, "filter": {"lang": "de"}})
    hits = response.json()["hits"]
    assert {h["id"] for h in hits} == {d["_id"] for d in DOCS if d["lang"] == "de"}
    both = client.post("/search", json={"query": exact_en, "k": 5, "filter": {"lang": "en", "year": 2021}})
    assert [h["id"] for h in both.json()["hits"]] == ["d2"]
    none = client.post("/search", json={"query": exact_en, "k": 5, "filter": {"lang": "xx"}})
    assert none.status_code == 200 and none.json()["hits"] == []
    hybrid = client.post("/search", json={"query": exact_en, "k": 5, "filter": {"lang": "fr"}, "hybrid": True})
    assert {h["id"] for h in hybrid.json()["hits"]} == {"d5", "d7"}


def test_search_rerank_reorders_by_cross_encoder(client, cross_encoder_dir):
    query = "the train to the city"
    response = client.post("/search", json={"query": query, "k": 3, "rerank": True})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    ce = CrossEncoder(str(cross_encoder_dir), device="cpu")
    expected = [float(s) for s in ce.predict([(query, f"{h['title']} {h['text']}") for h in hits])]
    assert [h["score"] for h in hits] == pytest.approx(expected, abs=1e-5)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_search_without_index_is_404(tiny_model_dir, tmp_path):
    bundle = build_bundle(tiny_model_dir, None, tmp_path / "bundle", device="cpu")
    with TestClient(create_app(bundle, ServeConfig())) as client:
        response = client.post("/search", json={"query": "the cat"})
        assert response.status_code == 404
        assert "no index" in response.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "the cat"}).status_code == 200


# --- config and command line -----------------------------------------------------------------------------------

def test_health_reports_model(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["dim"] == 32 and health["index_size"] == len(DOCS)


@pytest.mark.parametrize("field, value", [("max_batch_size", 0), ("port", 70000), ("max_k", 0), ("cache_size", -1),
                                          ("max_input_tokens", -1), ("max_queue", 0), ("max_queue_wait_ms", 0),
                                          ("retry_after_s", 0), ("timeout_keep_alive", 0)])
def test_config_validate_names_the_key(field, value):
    with pytest.raises(ValueError, match=f"serve.{field}"):
        ServeConfig(**{field: value}).validate()


def test_main_help_and_bad_key(capsys):
    with pytest.raises(SystemExit) as done:
        main(["up", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "serve.microbatch (bool) = True" in help_text and "serve.port=8080" in help_text
    assert main(["up", "--bundle", "x", "serve.max_batch_size=0"]) == 2
    assert "serve.max_batch_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # a flag of the old command line says what to write instead
        main(["up", "--bundle", "x", "--no-microbatch"])
    assert done.value.code == 2
    assert "write serve.microbatch=false" in capsys.readouterr().err


def test_unknown_serve_key_exits_2_naming_it(tmp_path, capsys):
    assert main(["up", "--bundle", "x", "serve.prot=8080"]) == 2
    assert "unknown key 'serve.prot'" in capsys.readouterr().err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("serve:\n  port: 8080\n  micro_batch: false\n")
    assert main(["up", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:3" in err and "unknown key 'serve.micro_batch'" in err


def test_yaml_serve_section_reaches_the_app(bundle_dir, tmp_path, monkeypatch):
    """``python -m embtune.serve up CONFIG key=value``: the YAML's serve section, with the override on top, is what
    the app
    runs with (uvicorn.run is replaced by a TestClient on the app it was given)."""
    import uvicorn

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nserve:\n  bundle_dir: {bundle_dir}\n  model_name: from-yaml\n"
                      "  max_k: 3\n  port: 9123\n  cache_size: 5\n")
    served = {}

    def fake_run(app, host, port, **kwargs):
        served.update(host=host, port=port)
        with TestClient(app) as client:
            served["health"] = client.get("/health").json()
            served["too_many"] = client.post("/search", json={"query": "the cat", "k": 4}).json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["up", str(recipe), "serve.port=9124"]) == 0
    assert served["port"] == 9124 and served["host"] == "127.0.0.1"  # the override beats the YAML
    assert served["health"]["model"] == "from-yaml" and served["health"]["cache"]["capacity"] == 5
    assert "between 1 and 3 (serve.max_k)" in served["too_many"]["error"]["message"]


def test_bundle_dir_defaults_to_the_recipes_export(tmp_path):
    from embtune.serve.__main__ import config_from_args

    assert config_from_args([f"run_dir={tmp_path}"]).bundle_dir == str(tmp_path / "bundle")
    assert config_from_args([f"run_dir={tmp_path}", "export.out_dir=elsewhere"]).bundle_dir == "elsewhere"
    assert config_from_args(["--bundle", "b", "serve.bundle_dir=a"]).bundle_dir == "b"


def test_a_static_embedding_model_is_bundled_and_served(tiny_model_dir, tiny_beir, tmp_path):
    """sentence-transformers' StaticEmbedding has no token limit (max_seq_length is infinite): the bundle records
    0 (the model's own) and serves its vectors."""
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    from embtune.serve.bundle import MANIFEST_FILE, load_bundle
    from tests.test_vectordb_export import _docs

    tokenizer = SentenceTransformer(str(tiny_model_dir), device="cpu").tokenizer
    static = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=8), Normalize()], device="cpu")
    static.save(str(tmp_path / "static"))
    out = build_bundle(tmp_path / "static", _docs(tiny_beir), tmp_path / "bundle", device="cpu")
    manifest = __import__("json").loads((out / MANIFEST_FILE).read_text())
    assert manifest["max_seq_length"] == 0 and manifest["num_docs"] == 72
    bundle = load_bundle(out, device="cpu")
    np.testing.assert_allclose(bundle.encode(["alpha beta"]), static.encode(["alpha beta"]), atol=1e-6)
