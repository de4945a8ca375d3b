"""HTTP server for an export bundle: OpenAI-compatible embeddings, search over the bundle's index, health.

Routes:
  - ``POST /v1/embeddings``: the OpenAI embeddings API (``input``, ``model``, ``dimensions``, ``encoding_format``),
    so the ``openai`` client works against it unchanged.
  - ``POST /search``: ``{query, k, filter, hybrid, rerank}`` → ranked hits from ``index/corpus.faiss``.
  - ``GET /v1/models``, ``GET /health`` (the only route that needs no API key, for liveness probes).

Bad input is a 4xx whose body is OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the
message names the field and the limit; the openai client raises it as ``BadRequestError`` with that message.

Example::

    python -c "from serve.app import main; main()" --bundle runs/x/export --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import re
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.batcher import LRUCache, MicroBatcher
from embtune.dataio import document_text
from serve.bundle import Bundle, load_bundle
from serve.serve_config import ServeConfig

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


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be true or false, got {_type_name(value)}", param=name)
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
    rows = rows[:, :dimensions]  # (n, dimensions)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)  # (n, 1)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


def _encode_row(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's base64 format: the raw little-endian float32 bytes of the vector.
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.tolist()


_WORD = re.compile(r"\w+", re.UNICODE)


def _bm25_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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
    state: dict[str, Any] = {"bm25": None, "cross_encoder": None}
    lazy_lock = asyncio.Lock()

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

    async def bm25():
        async with lazy_lock:
            if state["bm25"] is None:
                from rank_bm25 import BM25Okapi

                corpus = [_bm25_tokens(document_text(d)) for d in bundle.docs]
                state["bm25"] = await asyncio.to_thread(BM25Okapi, corpus)
                logger.info("built BM25 over %d docs for hybrid search", len(corpus))
        return state["bm25"]

    async def cross_encoder():
        async with lazy_lock:
            if state["cross_encoder"] is None:
                from sentence_transformers import CrossEncoder

                state["cross_encoder"] = await asyncio.to_thread(CrossEncoder, cfg.cross_encoder,
                                                                 device=cfg.device or None)
        return state["cross_encoder"]

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
        import faiss

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
        hybrid, rerank = _bool_field(body, "hybrid"), _bool_field(body, "rerank")
        if hybrid and not bundle.docs:
            raise RequestError(400, "hybrid search needs index/docs.jsonl in the bundle", param="hybrid")
        if rerank and not cfg.cross_encoder:
            raise RequestError(400, "rerank needs a cross-encoder: set serve.cross_encoder (--cross-encoder)",
                               param="rerank")
        if filters and not bundle.docs:
            raise RequestError(400, "filters need index/docs.jsonl in the bundle", param="filter")

        allowed = allowed_rows(filters)
        hits: list[tuple[int, float]] = []  # (row, score)
        if allowed is None or allowed.size:
            depth = max(k, cfg.rerank_candidates if rerank else 0, 100 if hybrid else 0)
            depth = min(depth, bundle.index.ntotal if allowed is None else int(allowed.size))
            query_row = await embed([query])  # (1, dim)
            params = None if allowed is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
            scores, rows = bundle.index.search(query_row, depth, params=params)  # (1, depth) each
            hits = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
            if hybrid:
                bm25_scores = (await bm25()).get_scores(_bm25_tokens(query))  # (num_docs,)
                if allowed is not None:
                    mask = np.full(bm25_scores.shape, -np.inf)
                    mask[allowed] = 0.0
                    bm25_scores = bm25_scores + mask
                top = np.argsort(-bm25_scores)[:depth]
                lexical = [int(r) for r in top if bm25_scores[r] > 0]  # no shared term: not a BM25 hit
                fused: dict[int, float] = {}
                for ranking in ([r for r, _ in hits], lexical):
                    for rank, row in enumerate(ranking):
                        fused[row] = fused.get(row, 0.0) + 1.0 / (cfg.rrf_k + rank + 1)
                hits = sorted(fused.items(), key=lambda item: -item[1])
            if rerank:
                candidates = hits[:cfg.rerank_candidates]
                model = await cross_encoder()
                pairs = [(query, document_text(bundle.docs[row])) for row, _ in candidates]
                ce_scores = await asyncio.to_thread(model.predict, pairs, show_progress_bar=False)
                hits = sorted(((row, float(s)) for (row, _), s in zip(candidates, ce_scores)), key=lambda h: -h[1])
        out = []
        for row, score in hits[:k]:
            doc = bundle.docs[row] if bundle.docs else {"_id": str(row)}
            out.append({"id": doc.get("_id", str(row)), "score": score, "title": doc.get("title", ""),
                        "text": doc.get("text", ""),
                        "metadata": {key: v for key, v in doc.items() if key not in TEXT_FIELDS | {"_id"}}})
        return {"object": "list", "model": model_name, "query": query, "hits": out}

    return app


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(prog="python -m serve", description="Serve an embtune export bundle over HTTP.")
    parser.add_argument("--bundle", required=True, help="the export bundle folder (model/, index/, manifest.json)")
    parser.add_argument("--host", default=defaults.host, help="bind address (default loopback: %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--api-key", default=defaults.api_key,
                        help="require 'Authorization: Bearer KEY' (prefer the EMBTUNE_API_KEY environment variable)")
    parser.add_argument("--model-name", default=defaults.model_name, help="the model name reported in responses")
    parser.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default=defaults.backend,
                        help="encoder backend (onnx-int8: int8 dynamic quantization, needs export.onnx_int8)")
    parser.add_argument("--onnx-file", default=defaults.onnx_file,
                        help="ONNX file under <bundle>/model (default: the backend's own)")
    parser.add_argument("--device", default=defaults.device, help="torch device (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads per forward pass; 0 = library default (all cores)")
    parser.add_argument("--no-microbatch", action="store_true", help="one request per forward pass")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument("--cache-size", type=int, default=defaults.cache_size, help="LRU entries; 0 = off")
    parser.add_argument("--max-inputs", type=int, default=defaults.max_inputs)
    parser.add_argument("--max-input-chars", type=int, default=defaults.max_input_chars)
    parser.add_argument("--max-input-tokens", type=int, default=defaults.max_input_tokens)
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--cross-encoder", default=defaults.cross_encoder, help="CrossEncoder path for rerank")
    parser.add_argument("--log-level", default=defaults.log_level, choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    cfg = ServeConfig(
        bundle_dir=args.bundle, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
        backend=args.backend, onnx_file=args.onnx_file, device=args.device, threads=args.threads,
        microbatch=not args.no_microbatch, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        cache_size=args.cache_size, max_inputs=args.max_inputs, max_input_chars=args.max_input_chars,
        max_input_tokens=args.max_input_tokens, max_k=args.max_k, cross_encoder=args.cross_encoder,
        log_level=args.log_level,
    )
    cfg.validate()
    return cfg


def run_server(cfg: ServeConfig, access_log: bool = False) -> None:
    """Serve ``cfg.bundle_dir`` with uvicorn until interrupted (what the lead's ``python -m serve`` calls)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.bundle_dir:
        raise ValueError("serve.bundle_dir must name an export bundle folder")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("EMBTUNE_API_KEY")):
        logger.warning("binding %s without an API key: anyone who can reach this port can use the model", cfg.host)
    logger.info("config: %s", {k: ("***" if k == "api_key" and v else v) for k, v in asdict(cfg).items()})
    app = create_app(cfg.bundle_dir, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=access_log)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``main(["--bundle", "runs/x/export", "--port", "8000"])``."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        build_parser().error(str(err))
    run_server(cfg, access_log=args.access_log)


if __name__ == "__main__":  # pragma: no cover
    main()
