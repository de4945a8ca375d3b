"""serve under overload: what a refused, a late and an abandoned request cost the encoder (nothing), where tokens are
counted (the encode thread, not the event loop), and passes sized by tokens."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest

from embtune.sections.serve import ServeConfig
from embtune.serve.app import create_app
from embtune.serve.batcher import Expired, MicroBatcher
from embtune.serve.bundle import build_bundle
from tests.conftest import uvicorn_in_thread


@pytest.fixture(scope="module")
def bundle_dir(tiny_model_dir, tmp_path_factory):
    return build_bundle(tiny_model_dir, None, tmp_path_factory.mktemp("overload") / "bundle", device="cpu")


def _recording_app(bundle_dir, **cfg):
    """An app whose encoder holds each pass until ``release`` is set, and records every text it encodes and the
    thread that counted tokens."""
    app = create_app(bundle_dir, ServeConfig(cache_size=0, **cfg))
    batcher = app.state.batcher
    release, encoded, counted_on = threading.Event(), [], set()
    encode, count = batcher._encode, batcher.count_tokens

    def held_encode(texts):
        release.wait(timeout=30)
        encoded.extend(texts)
        return encode(texts)

    def recording_count(texts):
        counted_on.add(threading.current_thread().name)
        return count(texts)

    batcher._encode, batcher.count_tokens = held_encode, recording_count
    return app, release, encoded, counted_on


async def _until_in_flight(http: httpx.AsyncClient, n: int) -> None:
    while (await http.get("/health")).json()["queue"]["in_flight"] < n:
        await asyncio.sleep(0.01)


def test_a_refused_request_never_reaches_the_encoder_nor_the_parser(bundle_dir):
    """At max_queue the next request is refused before its body is read: even invalid JSON gets the 503, not a
    400, and neither its tokens nor its text reach the batcher."""
    app, release, encoded, counted_on = _recording_app(bundle_dir, max_queue=1, max_queue_wait_ms=60_000)

    async def fire(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            admitted = asyncio.create_task(http.post("/v1/embeddings", json={"input": "the cat"}))
            await _until_in_flight(http, 1)
            refused = await http.post("/v1/embeddings", json={"input": "refused text"})
            not_json = await http.post("/v1/embeddings", content=b"{not json", headers={
                "content-type": "application/json"})
            batcher = (await http.get("/health")).json()["batcher"]
            release.set()
            return refused, not_json, batcher, await admitted

    with uvicorn_in_thread(app) as base_url:
        refused, not_json, batcher, admitted = asyncio.run(fire(base_url))
    assert refused.status_code == not_json.status_code == 503 and refused.headers["retry-after"] == "1"
    assert 500 <= int(refused.headers["retry-after-ms"]) <= 1500
    assert admitted.status_code == 200
    assert encoded == ["the cat"] and batcher["requests"] == 0  # nothing of the refused ones was queued
    assert counted_on == {"embtune-encode"}  # tokens are counted in the encode thread, never on the event loop


def test_the_protocol_refuses_before_the_app_and_keeps_the_connection(bundle_dir):
    """With serve/front.py's protocol (what ``embtune.serve up`` runs), a refused request never becomes an ASGI call:
    the 503 (Retry-After, the OpenAI error body) is written by the protocol, its body is dropped unread, and the same
    keep-alive connection then serves an admitted request."""
    from embtune.serve.app import WORK_ROUTES
    from embtune.serve.front import admission_protocol

    app, release, encoded, _ = _recording_app(bundle_dir, max_queue=1, max_queue_wait_ms=60_000)
    calls = []
    app_call = type(app).__call__

    async def counting_call(scope, receive, send):
        if scope["type"] == "http" and scope["path"] in WORK_ROUTES:
            calls.append(scope["path"])
        await app_call(app, scope, receive, send)

    app_proxy = counting_call  # uvicorn takes any ASGI callable (lifespan included: it is passed on)
    protocol = admission_protocol(app.state.service.admission, WORK_ROUTES)
    assert protocol != "auto"  # httptools is installed (uvicorn[standard])

    async def exchange(reader, writer, payload: dict) -> tuple[int, dict[str, str], dict]:
        body = json.dumps(payload).encode()
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        return int(head[0].split()[1]), headers, json.loads(await reader.readexactly(int(headers["content-length"])))

    async def fire(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            held = asyncio.create_task(http.post("/v1/embeddings", json={"input": "the cat"}))
            await _until_in_flight(http, 1)
            # One raw connection for the refused request and the next: the second answer proves it stayed usable.
            reader, writer = await asyncio.open_connection("127.0.0.1", int(base_url.rsplit(":", 1)[1]))
            refused = await exchange(reader, writer, {"input": "refused " * 2000})  # a body of 16 kB
            release.set()
            await held
            admitted = await exchange(reader, writer, {"input": "a fish"})
            writer.close()
            return refused, admitted, (await http.get("/health")).json()

    with uvicorn_in_thread(app_proxy, http=protocol) as base_url:
        (status, headers, error), (ok, _, answer), health = asyncio.run(fire(base_url))
    assert status == 503 and headers["retry-after"] == "1" and 500 <= int(headers["retry-after-ms"]) <= 1500
    assert error["error"]["code"] == "overloaded" and "serve.max_queue" in error["error"]["message"]
    assert ok == 200 and len(answer["data"]) == 1
    assert calls == ["/v1/embeddings", "/v1/embeddings"]  # the held one and the admitted one: not the refused one
    assert encoded == ["the cat", "a fish"]
    assert health["queue"]["shed_full"] == 1


def test_a_request_whose_client_left_is_dropped_before_encoding(bundle_dir):
    app, release, encoded, _ = _recording_app(bundle_dir, max_queue=8, max_queue_wait_ms=60_000)

    async def fire(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            held = asyncio.create_task(http.post("/v1/embeddings", json={"input": "the cat"}))
            await _until_in_flight(http, 1)
            async with httpx.AsyncClient(base_url=base_url, timeout=0.3) as impatient:
                with pytest.raises(httpx.ReadTimeout):  # gives up while its request waits behind the held pass
                    await impatient.post("/v1/embeddings", json={"input": "a dog in the river"})
            while (await http.get("/health")).json()["queue"]["in_flight"] > 1:  # the server saw it go
                await asyncio.sleep(0.01)
            release.set()
            answered = await held
            after = await http.post("/v1/embeddings", json={"input": "a fish"})
            return answered, after, (await http.get("/health")).json()["batcher"]

    with uvicorn_in_thread(app) as base_url:
        answered, after, batcher = asyncio.run(fire(base_url))
    assert answered.status_code == after.status_code == 200
    assert encoded == ["the cat", "a fish"]  # the abandoned text never reached the model
    assert batcher["dropped_client_gone"] == 1


def test_a_request_past_drop_after_ms_gets_503_without_being_encoded(bundle_dir):
    app, release, encoded, _ = _recording_app(bundle_dir, max_queue=8, max_queue_wait_ms=60_000,
                                              drop_after_ms=100)

    async def fire(base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            held = asyncio.create_task(http.post("/v1/embeddings", json={"input": "the cat"}))
            await _until_in_flight(http, 1)
            late = asyncio.create_task(http.post("/v1/embeddings", json={"input": "a dog in the river"}))
            await _until_in_flight(http, 2)
            await asyncio.sleep(0.3)  # the second has now waited past drop_after_ms behind the held pass
            release.set()
            return await held, await late, (await http.get("/health")).json()["batcher"]

    with uvicorn_in_thread(app) as base_url:
        held, late, batcher = asyncio.run(fire(base_url))
    assert held.status_code == 200
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert "serve.drop_after_ms" in late.json()["error"]["message"]
    assert encoded == ["the cat"] and batcher["dropped_late"] == 1


def _word_batcher(**kwargs):
    """A batcher over a fake model whose tokens are words; records each pass's texts; the first pass holds."""
    release, passes = threading.Event(), []

    def encode(texts):
        if texts == ["hold"]:
            release.wait(timeout=30)
        passes.append(list(texts))
        return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = MicroBatcher(encode, count_tokens=lambda texts: [len(t.split()) for t in texts], **kwargs)
    return batcher, release, passes


def test_passes_are_sized_by_tokens_and_overlong_texts_refused():
    async def scenario():
        batcher, release, passes = _word_batcher(max_batch_size=64, max_batch_tokens=6, max_tokens=5)
        await batcher.start()
        held = asyncio.ensure_future(batcher.encode(["hold"]))
        await asyncio.sleep(0.05)
        texts = ["a b c", "d e", "f g h i", "j", "k l m n o"]  # 3, 2, 4, 1, 5 tokens
        queued = [asyncio.ensure_future(batcher.encode_counted([t])) for t in texts]
        too_long = asyncio.ensure_future(batcher.encode(["1 2 3 4 5 6"]))
        await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(held, *queued, too_long, return_exceptions=True)
        await batcher.stop()
        return passes, results

    passes, results = asyncio.run(scenario())
    assert passes == [["hold"], ["a b c", "d e"], ["f g h i", "j"], ["k l m n o"]]  # at most 6 tokens a pass
    assert [r[1] for r in results[1:6]] == [[3], [2], [4], [1], [5]]
    assert type(results[-1]).__name__ == "TooManyTokens" and results[-1].position == 0


def test_a_lone_request_pays_no_batching_wait_and_late_ones_are_dropped():
    async def scenario():
        batcher, release, passes = _word_batcher(max_batch_size=64, drop_after_ms=50)
        await batcher.start()
        started = time.perf_counter()
        await batcher.encode(["alone"])
        alone_s = time.perf_counter() - started
        held = asyncio.ensure_future(batcher.encode(["hold"]))
        await asyncio.sleep(0.02)
        late = asyncio.ensure_future(batcher.encode(["late"]))
        await asyncio.sleep(0.1)
        release.set()
        await held
        with pytest.raises(Expired):
            await late
        await batcher.stop()
        return alone_s, passes

    alone_s, passes = asyncio.run(scenario())
    assert alone_s < 0.05
    assert passes == [["alone"], ["hold"]]


def test_refused_clients_are_told_to_come_back_at_spread_times():
    """A burst refused at once must not come back at once: retry-after-ms (read first by the openai client) spreads
    the wait over 0.5-1.5 x Retry-After, the same on average."""
    from embtune.serve.app import RequestError

    waits = []
    for _ in range(400):
        _, _, headers = RequestError(503, "busy", retry_after_s=2).response()
        assert dict(headers)[b"retry-after"] == b"2"
        waits.append(int(dict(headers)[b"retry-after-ms"]))
    assert 1000 <= min(waits) and max(waits) <= 3000
    assert np.percentile(waits, 90) - np.percentile(waits, 10) > 1000  # spread over most of the 2 s range
    assert 1800 < np.mean(waits) < 2200


def test_retry_after_stretches_while_the_overload_lasts():
    """Each second that refused more than TARGET_PRESSURE requests per admission doubles the Retry-After (at most
    MAX_RETRY_STRETCH x serve.retry_after_s, spread 0.5-1.5 x); each calmer second halves it, back to 1 x."""
    from embtune.serve.app import MAX_RETRY_STRETCH, TARGET_PRESSURE, Admission

    now = [0.0]
    admission = Admission(max_queue=2, max_wait_s=60.0, retry_after_s=1, expected_wait=lambda: 0.0,
                          clock=lambda: now[0])
    assert all(admission.retry_after()[0] == 1 and 500 <= admission.retry_after()[1] <= 1500
               for _ in range(50))  # nothing measured yet

    def second(admitted: int, refused: int) -> None:
        """One second of traffic, closed by the first event of the next."""
        for _ in range(admitted):
            admission.admit()
            admission.in_flight -= 1
        admission.in_flight = admission.max_queue  # full: what comes next is refused
        for _ in range(refused):
            assert admission.refusal() is not None
        admission.in_flight = 0
        now[0] += 1.0

    second(2, 6)
    admission.admit()  # closes it: 3 refusals per admission
    assert admission.pressure == 3.0 and admission.stats()["refusals_per_admission"] == 3.0
    assert admission.stretch == 2.0 and admission.retry_after()[0] == 2
    waits = [admission.retry_after()[1] for _ in range(200)]
    assert 1000 <= min(waits) and max(waits) <= 3000 and np.mean(waits) > 1500
    for _ in range(6):  # a lasting overload: 4, 8, then the cap
        second(4, 8)
    admission.admit()
    assert admission.stretch == MAX_RETRY_STRETCH and admission.stats()["retry_stretch"] == MAX_RETRY_STRETCH
    assert max(admission.retry_after()[1] for _ in range(200)) <= 1500 * MAX_RETRY_STRETCH
    second(40, int(40 * TARGET_PRESSURE))  # at the target, not above: the wait halves
    admission.admit()
    assert admission.stretch == MAX_RETRY_STRETCH / 2
    for _ in range(4):
        second(40, 0)
    admission.admit()
    assert admission.stretch == 1.0 and admission.retry_after()[0] == 1


