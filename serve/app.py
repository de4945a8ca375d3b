"""HTTP server for an export bundle: OpenAI-compatible embeddings, search over the bundle's index, health.

Routes:
  - ``POST /v1/embeddings``: the OpenAI embeddings API (``input``, ``model``, ``dimensions``, ``encoding_format``),
    so the ``openai`` client works against it unchanged.
  - ``POST /search``: ``{query, k, filter, hybrid, rerank}`` → ranked hits. It runs the bundle's ``retriever.json``
    (the retrieval system eval measured and recommended) through the core ``Retriever``, the one eval ran, so the
    served ranking is eval's; ``hybrid`` and ``rerank`` override the spec per request.
  - ``GET /v1/models``, ``GET /health`` (the only route that needs no API key, for liveness probes).

Bad input is a 4xx whose body is OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the
message names the field and the limit; the openai client raises it as ``BadRequestError`` with that message.

Handlers validate the request, then call the core (``embtune.retrieval``); they do not rank themselves.

Example::

    python -m serve up --bundle runs/x/bundle serve.port=8000
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from embtune.dataio import document_text
from embtune.retrieval.bm25 import BM25Config
from embtune.retrieval.encoder import truncate
from embtune.retrieval.fusion import ranked
from embtune.retrieval.spec import FusionSpec, RerankSpec, Retriever, RetrieverSpec
from embtune.sections.serve import ServeConfig
from serve.batcher import LRUCache, MicroBatcher
from serve.bundle import Bundle, load_bundle

logger = logging.getLogger(__name__)

EMBEDDING_FIELDS = {"input", "model", "dimensions", "encoding_format", "user"}
SEARCH_FIELDS = {"query", "k", "filter", "hybrid", "rerank"}
# Fields of docs.jsonl that are text, not metadata to filter on.
TEXT_FIELDS = {"title", "text"}


class RequestError(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _reject_unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}",
                           param=unknown[0])


def _int_field(body: dict[str, Any], name: str, default: int | None, low: int, high: int, limit_key: str) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer, got {_type_name(value)}", param=name)
    if not low <= value <= high:
        raise RequestError(400, f"'{name}' must be between {low} and {high} ({limit_key}), got {value}", param=name)
    return value


def _texts_from_input(value: Any, max_inputs: int) -> list[str]:
    """The ``input`` field as a list of strings; token arrays and other types are refused by name."""
    if value is None:
        raise RequestError(400, "'input' is required: a string or a list of strings", param="input")
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise RequestError(400, "'input' must not be an empty list", param="input")
        token_ids = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if token_ids or any(isinstance(v, list) for v in value):
            raise RequestError(400, "'input' as token ids is not supported by this server; send strings", param="input")
        texts = value
    else:
        raise RequestError(400, f"'input' must be a string or a list of strings, got {_type_name(value)}",
                           param="input")
    if len(texts) > max_inputs:
        raise RequestError(400, f"'input' has {len(texts)} items; at most {max_inputs} per request (serve.max_inputs)",
                           param="input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"input[{i}] must be a string, got {_type_name(text)}", param="input")
    return texts


def _check_lengths(bundle: Bundle, texts: list[str], names: list[str], max_chars: int, max_tokens: int,
                   param: str) -> list[int]:
    """Refuse empty and over-long texts (characters first: cheap; then tokens); return each text's token count."""
    for name, text in zip(names, texts):
        if not text.strip():
            raise RequestError(400, f"{name} is empty or whitespace only", param=param)
        if len(text) > max_chars:
            raise RequestError(400, f"{name} has {len(text)} characters; at most {max_chars} (serve.max_input_chars)",
                               param=param)
    counts = bundle.count_tokens(texts)
    for name, count in zip(names, counts):
        if count > max_tokens:
            raise RequestError(400, f"{name} has {count} tokens; the model reads at most {max_tokens} "
                               "(serve.max_input_tokens); split the text, it is not truncated silently", param=param)
    return counts


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


def _optional_bool(body: dict[str, Any], name: str) -> bool | None:
    """A true/false request field; absent or null = None (the bundle's spec decides)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be true or false, got {_type_name(value)}", param=name)
    return value


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


def create_app(bundle_dir: str | Path, cfg: ServeConfig | None = None) -> FastAPI:
    """Load the bundle at ``bundle_dir`` and return the FastAPI app that serves it (run it with uvicorn).

    The model loads here, once; the micro-batcher starts with the app (lifespan), so use
    ``with TestClient(app)`` in tests.
    """
    cfg = cfg or ServeConfig()
    cfg.validate()
    bundle = load_bundle(bundle_dir, backend=cfg.backend, onnx_file=cfg.onnx_file, device=cfg.device or None,
                         batch_size=cfg.max_batch_size, threads=cfg.threads)
    model_name = cfg.model_name or Path(bundle_dir).resolve().name
    max_tokens = cfg.max_input_tokens or bundle.max_seq_length
    api_key = cfg.api_key or os.environ.get("EMBTUNE_API_KEY", "")
    cache = LRUCache(cfg.cache_size)
    batcher = MicroBatcher(bundle.encode, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                           enabled=cfg.microbatch)
    metadata = _metadata_rows(bundle.docs)
    retriever = None
    if bundle.index is not None:
        # Built once here (FastBM25 too, when the spec fuses with it), not on a request.
        doc_ids = [d.get("_id", str(row)) for row, d in enumerate(bundle.docs)] or [
            str(row) for row in range(bundle.index.ntotal)]
        doc_texts = [document_text(d) for d in bundle.docs] or [""] * len(doc_ids)
        retriever = Retriever(bundle.spec, doc_ids, doc_texts, bundle.index, device=cfg.device or None)
        logger.info("/search serves %s", bundle.spec.describe())
    row_of = {doc_id: row for row, doc_id in enumerate(retriever.doc_ids)} if retriever else {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        logger.info("serving %s (%s, dim %d, %s docs) microbatch=%s", bundle_dir, cfg.backend, bundle.dim,
                    bundle.index.ntotal if bundle.index is not None else "no", cfg.microbatch)
        yield
        await batcher.stop()

    app = FastAPI(title="embtune serve", lifespan=lifespan)
    app.state.bundle, app.state.cache, app.state.batcher = bundle, cache, batcher

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(err.status, "invalid_request_error")
        return JSONResponse(_error_body(err.message, kind, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(_error_body(f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error"),
                            status_code=400)

    async def require_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def embed(texts: list[str]) -> np.ndarray:
        """Full-dimension normalized embeddings, (len(texts), dim): cache first, the rest in one batcher call."""
        rows: list[np.ndarray | None] = [cache.get(t) for t in texts]
        missing = list(dict.fromkeys(t for t, r in zip(texts, rows) if r is None))  # unique, in order
        if missing:
            fresh = await batcher.encode(missing)  # (len(missing), dim)
            by_text = dict(zip(missing, fresh))
            for text, row in by_text.items():
                cache.put(text, row)
            rows = [by_text[t] if r is None else r for t, r in zip(texts, rows)]
        return np.stack(rows).astype(np.float32, copy=False)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "backend": cfg.backend,
            "dim": bundle.dim,
            "dims": bundle.manifest.get("dims", [bundle.dim]),
            "index_size": int(bundle.index.ntotal) if bundle.index is not None else 0,
            "retriever": bundle.spec.to_dict(),
            "microbatch": cfg.microbatch,
            "batcher": batcher.stats(),
            "cache": {"size": len(cache), "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses},
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "embtune"}]}

    @app.post("/v1/embeddings", dependencies=[Depends(require_key)])
    async def embeddings(request: Request) -> JSONResponse:
        body = await _json_object(request)
        _reject_unknown(body, EMBEDDING_FIELDS)
        texts = _texts_from_input(body.get("input"), cfg.max_inputs)
        if "model" in body and not isinstance(body["model"], str):
            raise RequestError(400, f"'model' must be a string, got {_type_name(body['model'])}", param="model")
        dimensions = _int_field(body, "dimensions", None, 1, bundle.dim, "the model's dimension")
        encoding_format = body.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise RequestError(400, f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}",
                               param="encoding_format")
        names = [f"input[{i}]" for i in range(len(texts))] if isinstance(body["input"], list) else ["input"]
        counts = _check_lengths(bundle, texts, names, cfg.max_input_chars, max_tokens, "input")
        rows = _truncate(await embed(texts), dimensions)  # (n, dimensions or dim)
        data = [{"object": "embedding", "index": i, "embedding": _encode_row(row, encoding_format)}
                for i, row in enumerate(rows)]
        tokens = int(sum(counts))
        return JSONResponse({"object": "list", "data": data, "model": model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def allowed_rows(filters: dict[str, Any]) -> np.ndarray | None:
        """Row ids matching every equality filter (None = no filter)."""
        if not filters:
            return None
        allowed: np.ndarray | None = None
        for key, value in filters.items():
            if key not in metadata:
                known = ", ".join(sorted(metadata)) or "none"
                raise RequestError(400, f"filter key '{key}' is not a metadata field of this index (known: {known})",
                                   param="filter")
            if isinstance(value, (list, dict)):
                raise RequestError(400, f"filter['{key}'] must be a string, number, boolean or null (equality)",
                                   param="filter")
            rows = metadata[key].get(json.dumps(value), np.zeros(0, dtype=np.int64))
            allowed = rows if allowed is None else np.intersect1d(allowed, rows)
        return allowed

    @app.post("/search", dependencies=[Depends(require_key)])
    async def search(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        _reject_unknown(body, SEARCH_FIELDS)
        if bundle.index is None:
            raise RequestError(404, f"bundle {bundle.path} has no index (index/corpus.faiss); /search is unavailable")
        query = body.get("query")
        if not isinstance(query, str):
            raise RequestError(400, f"'query' must be a string, got {_type_name(query)}", param="query")
        _check_lengths(bundle, [query], ["query"], cfg.max_input_chars, max_tokens, "query")
        k = _int_field(body, "k", min(10, cfg.max_k), 1, cfg.max_k, "serve.max_k")
        filters = body.get("filter") or {}
        if not isinstance(filters, dict):
            raise RequestError(400, f"'filter' must be an object of field: value, got {_type_name(filters)}",
                               param="filter")
        if filters and not bundle.docs:
            raise RequestError(400, "filters need index/docs.jsonl in the bundle", param="filter")
        spec = request_spec(bundle.spec, _optional_bool(body, "hybrid"), _optional_bool(body, "rerank"), cfg,
                            has_docs=bool(bundle.docs))

        allowed = allowed_rows(filters)
        docs: dict[str, float] = {}
        if allowed is None or allowed.size:
            query_emb = await embed([query]) if spec.dense is not None else None  # (1, dim)
            run = await asyncio.to_thread(retriever.search, [query], query_emb, k, spec=spec, allowed=allowed)
            docs = run["0"]
        out = []
        for doc_id in ranked(docs):
            score = docs[doc_id]
            doc = bundle.docs[row_of[doc_id]] if bundle.docs else {"_id": doc_id}
            out.append({"id": doc_id, "score": score, "title": doc.get("title", ""), "text": doc.get("text", ""),
                        "metadata": {key: v for key, v in doc.items() if key not in TEXT_FIELDS | {"_id"}}})
        return {"object": "list", "model": model_name, "query": query, "retriever": spec.describe(), "hits": out}

    return app


def run_server(cfg: ServeConfig) -> None:
    """Serve ``cfg.bundle_dir`` with uvicorn until interrupted (``python -m serve up``)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(cfg.log_level.upper())
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("EMBTUNE_API_KEY")):
        logger.warning("binding %s without an API key: anyone who can reach this port can use the model", cfg.host)
    logger.info("config: %s", {k: ("***" if k == "api_key" and v else v) for k, v in asdict(cfg).items()})
    app = create_app(cfg.bundle_dir, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log)
