"""HTTP server for an export bundle: OpenAI-compatible embeddings, search over the bundle's index, health.

Routes:
  - ``POST /v1/embeddings``: the OpenAI embeddings API (``input``, ``model``, ``dimensions``, ``encoding_format``),
    so the ``openai`` client works against it unchanged.
  - ``POST /search``: ``{query, k, filter, hybrid, rerank}`` → ranked hits. It runs the bundle's ``retriever.json``
    (the retrieval system eval measured and recommended) through the core ``Retriever``, the one eval ran, so the
    served ranking is eval's; ``hybrid`` and ``rerank`` override the spec per request.
  - ``GET /v1/models``, ``GET /health`` (the only route that needs no API key, for liveness probes; it reports the
    admission queue's depth).

Bad input is a 4xx whose body is OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the
message names the field and the limit; the openai client raises it as ``BadRequestError`` with that message.

Admission control: at most ``serve.max_queue`` requests to ``/v1/embeddings`` and ``/search`` are in the server at
once, and none is admitted that would wait longer than ``serve.max_queue_wait_ms`` for the model; past
either a request is answered 503 with ``Retry-After`` at once instead of queueing without bound.

Under overload the server's one core is shared by the event loop (HTTP, JSON, admission) and the encode thread, and
every millisecond the loop spends on a request the encoder does not spend encoding. So: admission is decided first,
in :class:`ServeApp`, before FastAPI's stack or the body is looked at, and a refusal is a few hundred bytes written
back; ``POST /v1/embeddings``, the hot route, is answered by :func:`_fast_embeddings` (orjson and the same pydantic
model, without FastAPI's routing and dependency layers; anything unusual falls back to the FastAPI route, which
owns every error message); token counting and encoding run in the micro-batcher's thread; and a request whose
client has gone, or that waited past ``serve.drop_after_ms``, is dropped before its forward pass.

The shape: pydantic request models check each field's type, :class:`EmbeddingService` (the core the routes call)
checks the limits that depend on the bundle and the config and does the work, and each route handler does only
validate → call the core → shape the response.

Example::

    python -m embtune.serve up --bundle runs/x/bundle serve.port=8000
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hmac
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from embtune.retrieval.bm25 import BM25Config
from embtune.retrieval.docstore import DocStore
from embtune.retrieval.encoder import truncate
from embtune.retrieval.fusion import ranked
from embtune.retrieval.spec import FusionSpec, RerankSpec, Retriever, RetrieverSpec
from embtune.sections.serve import ServeConfig
from embtune.serve.batcher import Expired, LRUCache, MicroBatcher, TooManyTokens
from embtune.serve.bundle import Bundle, load_bundle, recorded_backend

logger = logging.getLogger(__name__)

# Fields of docs.jsonl that are text, not metadata to filter on.
TEXT_FIELDS = {"title", "text"}
# The routes that do work (a forward pass, a search); admission control counts and sheds only these.
WORK_ROUTES = ("/v1/embeddings", "/search")
MAX_RETRY_STRETCH = 10.0  # Admission.retry_after: at most 10 x serve.retry_after_s
TARGET_PRESSURE = 0.25  # Admission.retry_after: refusals per admission above which the wait doubles
REFUSED = "embtune_refused"  # the pydantic error type of a request field refused with one of our own messages


class RequestError(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int = 0, retry_after_ms: int = 0):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s  # > 0: sent as Retry-After (a 503)
        self.retry_after_ms = retry_after_ms  # > 0: the retry-after-ms to send (Admission.retry_after_ms)

    def response(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, JSON body, extra headers) in OpenAI's error shape."""
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}.get(
            self.status, "invalid_request_error")
        headers = []
        if self.retry_after_s:
            # Retry-After is whole seconds, so every client refused in one burst would come back in the same
            # instant, be refused together again, and keep the herd in step. retry-after-ms (the openai client
            # prefers it) spreads them over 0.5-1.5 x the wait, the same on average.
            spread_ms = self.retry_after_ms or int(self.retry_after_s * 1000 * (0.5 + random.random()))
            headers = [(b"retry-after", str(self.retry_after_s).encode()),
                       (b"retry-after-ms", str(spread_ms).encode())]
        return self.status, orjson.dumps(_error_body(self.message, kind, self.param, self.code)), headers


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --- request models: each field's type, refused with a message that names the field -----------------------------

def _refuse(message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error carrying our message and the OpenAI ``param``; ``_validation_error`` unpacks it."""
    return PydanticCustomError(REFUSED, "{message}", {"message": message, "param": param})


def _integer(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _refuse(f"'{name}' must be an integer, got {_type_name(value)}", name)
    return value


def _true_or_false(value: Any, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _refuse(f"'{name}' must be true or false, got {_type_name(value)}", name)
    return value


class _RequestBody(BaseModel):
    """A JSON object whose keys are this model's fields; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _json_object_with_known_fields(cls, body: Any) -> Any:
        if isinstance(body, bytes):  # FastAPI parses JSON only when the request says it is JSON (CSRF safety)
            raise _refuse("the request body must be JSON sent with 'Content-Type: application/json'")
        if not isinstance(body, dict):
            raise _refuse(f"the request body must be a JSON object, got {_type_name(body)}")
        unknown = sorted(set(body) - set(cls.model_fields))
        if unknown:
            raise _refuse(f"unknown field(s) {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(sorted(cls.model_fields))}", unknown[0])
        return body


class EmbeddingRequest(_RequestBody):
    """``POST /v1/embeddings``, OpenAI's request. Limits that depend on the bundle are checked by the service."""

    input: str | list[str] = Field(default=None, validate_default=True)  # type: ignore[assignment]
    model: str | None = None
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> str | list[str]:
        if value is None:
            raise _refuse("'input' is required: a string or a list of strings", "input")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _refuse(f"'input' must be a string or a list of strings, got {_type_name(value)}", "input")
        if not value:
            raise _refuse("'input' must not be an empty list", "input")
        token_ids = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if token_ids or any(isinstance(v, list) for v in value):
            raise _refuse("'input' as token ids is not supported by this server; send strings", "input")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise _refuse(f"input[{i}] must be a string, got {_type_name(text)}", "input")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_name(cls, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise _refuse(f"'model' must be a string, got {_type_name(value)}", "model")
        return value

    @field_validator("dimensions", mode="before")
    @classmethod
    def _dimensions(cls, value: Any) -> int | None:
        return _integer(value, "dimensions")

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> str:
        value = value or "float"
        if value not in ("float", "base64"):
            raise _refuse(f"'encoding_format' must be 'float' or 'base64', got {value!r}", "encoding_format")
        return value

    def texts(self) -> tuple[list[str], list[str]]:
        """The inputs as a list, and the name each has in error messages (``input`` or ``input[i]``)."""
        if isinstance(self.input, str):
            return [self.input], ["input"]
        return list(self.input), [f"input[{i}]" for i in range(len(self.input))]


class SearchRequest(_RequestBody):
    """``POST /search``. ``k`` None = min(10, serve.max_k); ``hybrid``/``rerank`` None = the bundle's spec decides."""

    query: str = Field(default=None, validate_default=True)  # type: ignore[assignment]
    k: int | None = None
    filter: dict[str, Any] = Field(default_factory=dict)
    hybrid: bool | None = None
    rerank: bool | None = None

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise _refuse(f"'query' must be a string, got {_type_name(value)}", "query")
        return value

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, value: Any) -> int | None:
        return _integer(value, "k")

    @field_validator("filter", mode="before")
    @classmethod
    def _filter(cls, value: Any) -> dict[str, Any]:
        value = value or {}
        if not isinstance(value, dict):
            raise _refuse(f"'filter' must be an object of field: value, got {_type_name(value)}", "filter")
        return value

    @field_validator("hybrid", "rerank", mode="before")
    @classmethod
    def _switch(cls, value: Any, info) -> bool | None:
        return _true_or_false(value, info.field_name)


# --- the core the routes call ------------------------------------------------------------------------------------

def _check_range(value: int, name: str, low: int, high: int, limit_key: str) -> int:
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be between {low} and {high} ({limit_key}), got {value}", param=name)
    return value


def _truncate(rows: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dimensions`` values and renormalize, as text-embedding-3 does."""
    if dimensions is None or dimensions == rows.shape[1]:
        return rows
    return truncate(rows, dimensions)  # (n, dimensions)


def _encode_row(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's base64 format: the raw little-endian float32 bytes of the vector.
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.tolist()


def request_spec(spec: RetrieverSpec, hybrid: bool | None, rerank: bool | None, cfg: ServeConfig,
                 has_docs: bool) -> RetrieverSpec:
    """The bundle's spec with a request's overrides; None leaves that part as the bundle serves it.

    ``hybrid``: false = the dense member alone; true = the spec's fusion, or (for a dense-only bundle) BM25 with
    the bundle's settings or the defaults, fused by RRF, which needs no tuned weight. ``rerank``: false = none;
    true = the spec's rerank, else ``serve.cross_encoder`` on the top ``serve.rerank_candidates``.
    """
    if hybrid and not has_docs:
        raise RequestError(400, "hybrid search needs index/docs.jsonl in the bundle", param="hybrid")
    if hybrid is False and spec.hybrid:
        spec = spec.replace(bm25=None, fusion=FusionSpec(method="none"))
    elif hybrid is False and spec.dense is None:
        raise RequestError(400, "'hybrid': false asks for dense search, but this bundle serves BM25 only",
                           param="hybrid")
    elif hybrid and not spec.hybrid:
        if spec.dense is None:
            raise RequestError(400, "hybrid search fuses dense with BM25, but this bundle serves BM25 only",
                               param="hybrid")
        spec = spec.replace(bm25=spec.bm25 or BM25Config(), fusion=FusionSpec(
            method="rrf", dense_weight=spec.fusion.dense_weight, rrf_k=spec.fusion.rrf_k, depth=spec.fusion.depth))
    if rerank is False:
        spec = spec.replace(rerank=None)
    elif rerank and spec.rerank is None:
        if not cfg.cross_encoder:
            raise RequestError(400, "rerank needs a cross-encoder: set serve.cross_encoder (serve.cross_encoder=PATH)",
                               param="rerank")
        if not has_docs:
            raise RequestError(400, "rerank needs index/docs.jsonl in the bundle", param="rerank")
        spec = spec.replace(rerank=RerankSpec(model=cfg.cross_encoder, top_k=cfg.rerank_candidates))
    return spec


def _metadata_rows(docs: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """field -> JSON-encoded value -> row ids, for equality filters. Lists and objects are not filterable."""
    table: dict[str, dict[str, list[int]]] = {}
    for row, doc in enumerate(docs):
        for key, value in doc.items():
            if key in TEXT_FIELDS or isinstance(value, (list, dict)):
                continue
            table.setdefault(key, {}).setdefault(json.dumps(value), []).append(row)
    return {key: {value: np.asarray(rows, dtype=np.int64) for value, rows in values.items()}
            for key, values in table.items()}


def rss_gb() -> float:
    """This process's resident memory (``VmRSS``: its anonymous pages and the mapped file pages it has touched)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:  # not Linux
        pass
    return float("nan")


def startup_report() -> dict[str, float]:
    """Seconds since this process started (from /proc, so the interpreter's and imports' time counts) and RSS."""
    process_s = float("nan")
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: start time
        process_s = float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return {"process_s": round(process_s, 2), "rss_gb": round(rss_gb(), 3),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Admission:
    """Whether the server takes one more work request, and counters for ``/health``.

    Two bounds: ``max_queue`` requests in the server at once (a hard cap on what waits), and ``max_wait_s``, how long
    a new request would wait for its forward pass (``MicroBatcher.expected_wait``: the queue ahead of it at the
    recent cost per text, or the oldest request's wait so far). The second follows the machine's speed: when forward
    passes slow down (a busy CPU, long inputs), fewer requests are admitted, before any waits too long.
    Only the event loop's thread touches it (:class:`ServeApp` admits there), so plain integers need no lock.
    """

    def __init__(self, max_queue: int, max_wait_s: float, retry_after_s: int, expected_wait: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic):
        self.max_queue, self.max_wait_s, self.retry_after_s = max_queue, max_wait_s, retry_after_s
        self.expected_wait = expected_wait
        self.in_flight = 0
        self.admitted = 0
        self.shed_full = 0
        self.shed_slow = 0
        self.clock = clock
        self.pressure = 0.0  # refusals per admission over the last whole second
        self.stretch = 1.0  # Retry-After in units of retry_after_s (retry_after)
        self._second, self._admitted_at, self._shed_at = clock(), 0, 0

    def retry_after(self) -> tuple[int, int]:
        """A refusal's (Retry-After seconds, retry-after-ms): ``retry_after_s`` times the current stretch, the
        milliseconds spread at random over 0.5-1.5 x so that a burst refused together does not come back together.

        A refused client that comes back while the server is still full is refused again, and every refusal takes
        the event loop from the encoder on the same core. A stretch proportional to the refusals per admission
        settles where about one client is refused per admission (each waiting client returning every ~2 s), so the
        stretch is a controller instead: each second that refused more than ``TARGET_PRESSURE`` requests per
        admission doubles it (at most ``MAX_RETRY_STRETCH``), each other second halves it (at least 1). Under a
        steady overload the waiting clients then come back a few times less often; when the overload ends, the
        stretch is back to 1 within a few seconds (clients told to wait longer before that still wait). The A/B
        that chose it: docs/serve.md.
        """
        return (max(1, round(self.retry_after_s * self.stretch)),
                int(self.retry_after_s * 1000 * self.stretch * (0.5 + random.random())))

    def _count(self, shed: bool) -> None:
        now = self.clock()
        if now - self._second >= 1.0:
            self.pressure = self._shed_at / max(1, self._admitted_at)
            self.stretch = (min(self.stretch * 2, MAX_RETRY_STRETCH) if self.pressure > TARGET_PRESSURE
                            else max(1.0, self.stretch / 2))
            self._second, self._admitted_at, self._shed_at = now, 0, 0
        if shed:
            self._shed_at += 1
        else:
            self._admitted_at += 1

    def admit(self) -> None:
        """Count a request admitted (the caller decrements ``in_flight`` when it is answered)."""
        self.in_flight += 1
        self.admitted += 1
        self._count(shed=False)

    def refusal(self) -> str | None:
        """Why the next request is refused (for its 503), or None to admit it."""
        refused = self._refusal()
        if refused is not None:
            self._count(shed=True)
        return refused

    def refusal_error(self) -> RequestError | None:
        """The 503 refusing the next request (with its Retry-After), or None to admit it."""
        refusal = self.refusal()
        if refusal is None:
            return None
        seconds, ms = self.retry_after()
        return RequestError(503, f"{refusal}; retry after {seconds} s", code="overloaded", retry_after_s=seconds,
                            retry_after_ms=ms)

    def _refusal(self) -> str | None:
        if self.in_flight >= self.max_queue:
            self.shed_full += 1
            return f"the server has {self.in_flight} requests in progress, its limit (serve.max_queue)"
        wait = self.expected_wait()
        if wait > self.max_wait_s:
            self.shed_slow += 1
            return (f"a request would wait {wait * 1000:.0f} ms for the model, more than serve.max_queue_wait_ms "
                    f"({self.max_wait_s * 1000:.0f})")
        return None

    def stats(self) -> dict[str, float]:
        return {"in_flight": self.in_flight, "max_queue": self.max_queue,
                "expected_wait_ms": round(self.expected_wait() * 1000, 1), "max_queue_wait_ms": self.max_wait_s * 1000,
                "admitted": self.admitted, "shed_503": self.shed_full + self.shed_slow, "shed_full": self.shed_full,
                "shed_slow": self.shed_slow, "refusals_per_admission": round(self.pressure, 2),
                "retry_stretch": self.stretch}


class EmbeddingService:
    """The loaded bundle and what serves it: the micro-batcher, the cache, the retriever, the limits.

    Threads: token counting and forward passes run in the micro-batcher's one thread, searches in one search
    thread (the retriever's BM25 tokenizer and cross-encoder are not shared across threads); the event loop only
    parses, checks what is cheap (counts and characters) and answers.
    """

    def __init__(self, bundle_dir: str | Path, cfg: ServeConfig):
        self.cfg = cfg
        # No backend asked: load_bundle encodes with the one the bundle records.
        self.bundle: Bundle = load_bundle(bundle_dir, onnx_file=cfg.onnx_file, device=cfg.device or None,
                                          batch_size=cfg.max_batch_size, threads=cfg.threads)
        self.backend = recorded_backend(self.bundle.manifest)
        self.model_name = cfg.model_name or Path(bundle_dir).resolve().name
        self.max_tokens = cfg.max_input_tokens or self.bundle.max_seq_length
        self.api_key = cfg.api_key or os.environ.get("EMBTUNE_API_KEY", "")
        self.cache = LRUCache(cfg.cache_size)
        self.batcher = MicroBatcher(self.bundle.encode, max_batch_size=cfg.max_batch_size,
                                    max_wait_ms=cfg.max_wait_ms, enabled=cfg.microbatch,
                                    count_tokens=self.bundle.count_tokens, max_tokens=self.max_tokens,
                                    max_batch_tokens=cfg.max_batch_tokens, drop_after_ms=cfg.drop_after_ms)
        self.admission = Admission(cfg.max_queue, cfg.max_queue_wait_ms / 1000, cfg.retry_after_s,
                                   self.batcher.expected_wait)
        bundle = self.bundle
        on_disk = isinstance(bundle.docs, DocStore)
        # Filters index the metadata fields at start; a store whose export recorded none is not read at all.
        scan = not on_disk or bundle.manifest.get("metadata_fields", True)
        self.metadata = _metadata_rows(bundle.docs) if scan else {}
        self.retriever: Retriever | None = None
        self.row_of: Callable[[str], int] = {}.__getitem__
        self._search_thread: ThreadPoolExecutor | None = None
        if bundle.index is not None:
            # Built once here (BM25 loaded from the bundle, or built when it has none), not on a request.
            if on_disk:  # ids and texts stay on disk; a hit's row is found by the store's id index
                doc_ids, doc_texts = bundle.docs.ids, bundle.doc_texts
                self.row_of = bundle.docs.row_of
            else:
                doc_ids = [d.get("_id", str(row)) for row, d in enumerate(bundle.docs)] or [
                    str(row) for row in range(bundle.index.ntotal)]
                doc_texts = bundle.doc_texts or [""] * len(doc_ids)  # titles as the index embedded them
                self.row_of = {doc_id: row for row, doc_id in enumerate(doc_ids)}.__getitem__
            self.retriever = Retriever(bundle.spec, doc_ids, doc_texts, bundle.index, device=cfg.device or None,
                                       bm25=bundle.bm25)
            logger.info("/search serves %s", bundle.spec.describe())
        self.startup = startup_report()
        logger.info("ready: %.2f s since the process started, RSS %.3f GB (index %s)", self.startup["process_s"],
                    self.startup["rss_gb"], bundle.manifest.get("index", {}).get("factory", "Flat"))

    async def start(self) -> None:
        await self.batcher.start()
        self._search_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embtune-search")
        bundle = self.bundle
        logger.info("serving %s (%s, dim %d, %s docs) microbatch=%s max_queue=%d", bundle.path, self.backend,
                    bundle.dim, bundle.index.ntotal if bundle.index is not None else "no", self.cfg.microbatch,
                    self.cfg.max_queue)

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._search_thread is not None:
            self._search_thread.shutdown(wait=True)

    # validation that depends on the bundle and the config

    def check_texts(self, texts: list[str], names: list[str], param: str) -> None:
        """Refuse empty texts and texts over ``serve.max_input_chars`` (cheap, on the event loop). Tokens are
        counted where the text is encoded, in the micro-batcher's thread (:meth:`embed`)."""
        max_chars = self.cfg.max_input_chars
        for name, text in zip(names, texts):
            if not text.strip():
                raise RequestError(400, f"{name} is empty or whitespace only", param=param)
            if len(text) > max_chars:
                raise RequestError(400, f"{name} has {len(text)} characters; at most {max_chars} "
                                   "(serve.max_input_chars)", param=param)

    def too_many_tokens(self, name: str, count: int, param: str) -> RequestError:
        return RequestError(400, f"{name} has {count} tokens; the model reads at most {self.max_tokens} "
                            "(serve.max_input_tokens); split the text, it is not truncated silently", param=param)

    def check_embedding_request(self, request: EmbeddingRequest) -> tuple[list[str], list[str]]:
        """The request's texts and their names, or a RequestError naming the limit it breaks."""
        texts, names = request.texts()
        if len(texts) > self.cfg.max_inputs:
            raise RequestError(400, f"'input' has {len(texts)} items; at most {self.cfg.max_inputs} per request "
                               "(serve.max_inputs)", param="input")
        if request.dimensions is not None:
            _check_range(request.dimensions, "dimensions", 1, self.bundle.dim, "the model's dimension")
        self.check_texts(texts, names, "input")
        return texts, names

    def check_search_request(self, request: SearchRequest) -> tuple[int, RetrieverSpec, np.ndarray | None]:
        """``k``, the spec this request runs, and the rows its filter allows (None = all)."""
        if self.retriever is None:
            raise RequestError(404, f"bundle {self.bundle.path} has no index (index/corpus.faiss); /search is "
                               "unavailable")
        self.check_texts([request.query], ["query"], "query")
        max_k = self.cfg.max_k
        k = min(10, max_k) if request.k is None else _check_range(request.k, "k", 1, max_k, "serve.max_k")
        if request.filter and not self.bundle.docs:
            raise RequestError(400, "filters need index/docs.jsonl in the bundle", param="filter")
        spec = request_spec(self.bundle.spec, request.hybrid, request.rerank, self.cfg,
                            has_docs=bool(self.bundle.docs))
        return k, spec, self.allowed_rows(request.filter)

    def allowed_rows(self, filters: dict[str, Any]) -> np.ndarray | None:
        """Row ids matching every equality filter (None = no filter)."""
        if not filters:
            return None
        allowed: np.ndarray | None = None
        for key, value in filters.items():
            if key not in self.metadata:
                known = ", ".join(sorted(self.metadata)) or "none"
                raise RequestError(400, f"filter key '{key}' is not a metadata field of this index (known: {known})",
                                   param="filter")
            if isinstance(value, (list, dict)):
                raise RequestError(400, f"filter['{key}'] must be a string, number, boolean or null (equality)",
                                   param="filter")
            rows = self.metadata[key].get(json.dumps(value), np.zeros(0, dtype=np.int64))
            allowed = rows if allowed is None else np.intersect1d(allowed, rows)
        return allowed

    # the work

    async def embed(self, texts: list[str], names: list[str] | None = None,
                    param: str = "input") -> tuple[np.ndarray, list[int]]:
        """Full-dimension embeddings as eval encodes queries, (len(texts), dim), and each text's tokens: cache first,
        the rest in one batcher call. A text over the token limit is a 400 naming it (``names``, default
        ``input[i]``); a request dropped for waiting past ``serve.drop_after_ms`` is a 503 with Retry-After."""
        found = [self.cache.get(t) for t in texts]  # (row, tokens) or None
        missing = list(dict.fromkeys(t for t, f in zip(texts, found) if f is None))  # unique, in order
        if missing:
            try:
                fresh, counts = await self.batcher.encode_counted(missing)  # (len(missing), dim)
            except TooManyTokens as err:
                position = texts.index(missing[err.position])
                name = names[position] if names else f"input[{position}]"
                raise self.too_many_tokens(name, err.tokens, param) from None
            except Expired as err:
                raise RequestError(503, f"the request waited {err.waited_s * 1000:.0f} ms for the model, more "
                                   f"than serve.drop_after_ms ({err.limit_s * 1000:.0f}); retry after "
                                   f"{self.cfg.retry_after_s} s", code="overloaded",
                                   retry_after_s=self.cfg.retry_after_s) from None
            for text, row, count in zip(missing, fresh, counts):
                self.cache.put(text, row, count)
            if len(missing) == len(texts):  # nothing cached, no repeats: the batcher's rows as they are
                return fresh, counts
            by_text = {text: (row, count) for text, row, count in zip(missing, fresh, counts)}
            found = [by_text[t] if f is None else f for t, f in zip(texts, found)]
        return np.stack([row for row, _ in found]).astype(np.float32, copy=False), [count for _, count in found]

    async def search(self, query: str, k: int, spec: RetrieverSpec, allowed: np.ndarray | None) -> list[dict]:
        """The top ``k`` hits of ``query`` under ``spec`` among ``allowed`` rows, each with its document."""
        docs: dict[str, float] = {}
        if spec.dense is None or not (allowed is None or allowed.size):  # no embedding counts the query's tokens
            count = self.bundle.count_tokens([query])[0]
            if count > self.max_tokens:
                raise self.too_many_tokens("query", count, "query")
        if allowed is None or allowed.size:
            query_emb = (await self.embed([query], ["query"], "query"))[0] if spec.dense is not None else None
            run = await asyncio.get_running_loop().run_in_executor(
                self._search_thread, lambda: self.retriever.search([query], query_emb, k, spec=spec, allowed=allowed))
            docs = run["0"]
        hits = []
        for doc_id in ranked(docs):
            doc = self.bundle.docs[self.row_of(doc_id)] if self.bundle.docs else {"_id": doc_id}
            hits.append({"id": doc_id, "score": docs[doc_id], "title": doc.get("title", ""),
                         "text": doc.get("text", ""),
                         "metadata": {key: v for key, v in doc.items() if key not in TEXT_FIELDS | {"_id"}}})
        return hits

    def health(self) -> dict[str, Any]:
        bundle, cache = self.bundle, self.cache
        return {
            "status": "ok",
            "model": self.model_name,
            "backend": self.backend,
            "dim": bundle.dim,
            "dims": bundle.manifest.get("dims", [bundle.dim]),
            "index_size": int(bundle.index.ntotal) if bundle.index is not None else 0,
            "index": bundle.manifest.get("index", {"kind": "flat"}) if bundle.index is not None else None,
            "startup": self.startup,
            "rss_gb": round(rss_gb(), 3),
            "retriever": bundle.spec.to_dict(),
            "microbatch": self.cfg.microbatch,
            "queue": self.admission.stats(),
            "batcher": self.batcher.stats(),
            "cache": {"size": len(cache), "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses},
        }


# --- routes: validate, call the service, shape the response -------------------------------------------------------

router = APIRouter()


async def service_of(request: Request) -> EmbeddingService:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request for one attribute
    return request.app.state.service


async def require_key(request: Request) -> None:
    """Every route but /health needs ``Authorization: Bearer <serve.api_key>`` when a key is set."""
    api_key = request.app.state.service.api_key
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


@router.get("/health")
async def health(service: EmbeddingService = Depends(service_of)) -> dict[str, Any]:
    return service.health()


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(service: EmbeddingService = Depends(service_of)) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "embtune"}]}


async def embedding_response(body: EmbeddingRequest, service: EmbeddingService) -> bytes:
    """The JSON of the answer to ``body`` (checks, cache, batcher), or a RequestError."""
    texts, names = service.check_embedding_request(body)
    rows, counts = await service.embed(texts, names)
    rows = _truncate(rows, body.dimensions)  # (n, dimensions or dim)
    if body.encoding_format == "base64":
        vectors: Any = [_encode_row(row, "base64") for row in rows]
    else:  # float64 first: the same decimal digits as row.tolist() (the float32 value, exactly), at orjson's speed
        vectors = rows.astype(np.float64)
    data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]
    tokens = int(sum(counts))
    return orjson.dumps({"object": "list", "data": data, "model": service.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


@router.post("/v1/embeddings", dependencies=[Depends(require_key)])
async def embeddings(body: EmbeddingRequest, service: EmbeddingService = Depends(service_of)) -> Response:
    return Response(await embedding_response(body, service), media_type="application/json")


@router.post("/search", dependencies=[Depends(require_key)])
async def search(body: SearchRequest, service: EmbeddingService = Depends(service_of)) -> dict[str, Any]:
    k, spec, allowed = service.check_search_request(body)
    hits = await service.search(body.query, k, spec, allowed)
    return {"object": "list", "model": service.model_name, "query": body.query, "retriever": spec.describe(),
            "hits": hits}


async def _request_error(request: Request, err: RequestError) -> Response:
    status, body, headers = err.response()
    return Response(body, status_code=status, media_type="application/json",
                    headers={name.decode(): value.decode() for name, value in headers})


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """A request model's first error as a 400 in OpenAI's shape: our own message when a validator wrote one."""
    first = err.errors()[0] if err.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    ctx = first.get("ctx") or {}
    param = loc[0] if loc else None
    if first.get("type") == REFUSED:
        message, param = ctx["message"], ctx.get("param")
    elif first.get("type") == "json_invalid":
        message, param = f"the request body is not valid JSON: {ctx.get('error')} at character {loc[0]}", None
    elif first.get("type") == "missing" and not loc:
        message = "the request body is required: a JSON object"
    else:
        message = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}"
    return JSONResponse(_error_body(message, "invalid_request_error", param), status_code=400)


# --- the front door: admission first, and the hot route without FastAPI's layers ----------------------------------

async def _send_json(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


def _key_ok(scope, api_key: str) -> bool:
    scheme, _, token = _header(scope, b"authorization").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _until_disconnect(receive) -> None:
    """Returns when the client has gone (or the response is complete: then it is cancelled first)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _fast_embeddings(app: FastAPI, service: EmbeddingService, scope, receive, send) -> None:
    """``POST /v1/embeddings`` for a well-formed JSON request: orjson, the same pydantic model and service, and the
    answer written straight to the connection. A request this path does not take (another content type, invalid
    JSON, a field the model refuses) is replayed into the FastAPI route, so every error message has one home."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    request = None
    if _header(scope, b"content-type").split(b";")[0].strip().lower() == b"application/json":
        try:
            request = EmbeddingRequest.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValueError):  # pydantic's ValidationError is a ValueError
            request = None
    if request is None or (service.api_key and not _key_ok(scope, service.api_key)):
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await FastAPI.__call__(app, scope, replay, send)
        return
    # Cancelling this task when the client goes cancels its queued request: the batcher drops it unencoded.
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    task = asyncio.current_task()
    waiting = True  # only the wait for the answer is cancelled: never the writing of it

    def client_gone(w: asyncio.Future) -> None:
        if waiting and not w.cancelled():
            task.cancel()

    watcher.add_done_callback(client_gone)
    try:
        answer = await embedding_response(request, service)
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return  # the client has gone: nobody to answer
        raise
    except RequestError as err:
        status, payload, headers = err.response()
        await _send_json(send, status, payload, headers)
        return
    except Exception:
        logger.exception("POST /v1/embeddings failed")
        await _send_json(send, 500, orjson.dumps(_error_body("internal server error", "server_error")))
        return
    finally:
        waiting = False
        watcher.cancel()
    await _send_json(send, 200, answer)


class ServeApp(FastAPI):
    """The FastAPI app behind a front door for the work routes (``WORK_ROUTES``).

    Admission is the first thing a work request meets, before FastAPI's middleware, routing, dependencies or the
    body: a refused request costs the server one small write. Not uvicorn's ``limit_concurrency``: that counts open
    connections, idle keep-alive ones included (a pool of 1,000 connections would be refused whole), and its 503
    carries no ``Retry-After``. ``POST /v1/embeddings`` is then answered by :func:`_fast_embeddings`; the other
    work routes by FastAPI.
    """

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in WORK_ROUTES:
            await super().__call__(scope, receive, send)
            return
        service: EmbeddingService = self.state.service
        admission = service.admission
        err = admission.refusal_error()
        if err is not None:
            # The body is read (not parsed), so the keep-alive connection stays usable on every HTTP implementation
            # (uvicorn's h11 one cannot start the next request on a connection with an unread body).
            message = {"more_body": True}
            while message.get("more_body", False):
                message = await receive()
            await _send_json(send, *err.response())
            return
        admission.admit()
        try:
            if scope["path"] == "/v1/embeddings" and scope["method"] == "POST":
                await _fast_embeddings(self, service, scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        finally:
            admission.in_flight -= 1


def create_app(bundle_dir: str | Path, cfg: ServeConfig | None = None) -> FastAPI:
    """Load the bundle at ``bundle_dir`` and return the FastAPI app that serves it (run it with uvicorn).

    The model loads here, once; the micro-batcher starts with the app (lifespan), so use
    ``with TestClient(app)`` in tests. ``app.state.service`` is the :class:`EmbeddingService`.
    """
    cfg = cfg or ServeConfig()
    cfg.validate()
    service = EmbeddingService(bundle_dir, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = ServeApp(title="embtune serve", lifespan=lifespan)
    app.state.service = service
    app.state.bundle, app.state.cache, app.state.batcher = service.bundle, service.cache, service.batcher
    app.include_router(router)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


def run_server(cfg: ServeConfig) -> None:
    """Serve ``cfg.bundle_dir`` with uvicorn until interrupted (``python -m embtune.serve up``)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(cfg.log_level.upper())
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("EMBTUNE_API_KEY")):
        logger.warning("binding %s without an API key: anyone who can reach this port can use the model", cfg.host)
    logger.info("config: %s", {k: ("***" if k == "api_key" and v else v) for k, v in asdict(cfg).items()})
    from embtune.serve.front import admission_protocol

    app = create_app(cfg.bundle_dir, cfg)
    # Everything loaded so far (the model, the index, the tokenizer) lives as long as the server: frozen, the
    # collector's full passes under load (a request makes garbage) do not walk it again.
    gc.freeze()
    # Most refusals are written by the HTTP protocol, before a request becomes an ASGI task (serve/front.py).
    http = admission_protocol(app.state.service.admission, WORK_ROUTES)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log,
                timeout_keep_alive=cfg.timeout_keep_alive, http=http)
