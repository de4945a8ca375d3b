"""Embeddings from any OpenAI-compatible endpoint, so eval can put text-embedding-3 (or a served model) in its table.

A model spec ``openai:<model>`` uses api.openai.com (or ``OPENAI_BASE_URL``) with the key in ``OPENAI_API_KEY``;
``openai:<model>@<base_url>`` names the server, e.g. ``openai:minilm@http://127.0.0.1:8000/v1`` for embtune's own
``serve``. The ``openai`` client does the HTTP and the base64 decoding; what it lacks for an evaluation, and this
module adds:

- batching (``eval.endpoint_batch_size`` texts per request, under the API's 2,048-input limit);
- retries that reuse the LLM client's policy (``embtune/llm/client.py``: 408/409/429/5xx, timeouts and connection
  errors, exponential backoff with jitter, Retry-After honoured; attempts and backoff from the ``llm`` section);
- a disk cache per batch (model, base URL, texts): a rerun, or a run that died half way through the corpus, sends
  only the batches it does not have. Paid calls are never made twice for the same text.

Example::

    encoder = EndpointEncoder.from_spec("openai:text-embedding-3-small")
    encoder.encode(["what is dense retrieval?"])  # (1, 1536) float32, L2-normalized
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embtune.llm.client import RETRYABLE_STATUS, backoff_delay, retry_after_seconds, status_reason
from embtune.llm.config import LLMConfig
from embtune.retrieval.encoder import cache_dir, normalize

logger = logging.getLogger(__name__)

SPEC_PREFIX = "openai:"


def is_endpoint_spec(name: str) -> bool:
    """True for ``openai:<model>[@<base_url>]`` model names."""
    return name.startswith(SPEC_PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``openai:<model>[@<base_url>]`` -> (model, base_url or None)."""
    if not is_endpoint_spec(spec):
        raise ValueError(f"endpoint model spec must start with '{SPEC_PREFIX}', got {spec!r}")
    model, _, base_url = spec[len(SPEC_PREFIX):].partition("@")
    if not model:
        raise ValueError(f"endpoint model spec {spec!r} names no model: expected openai:<model>[@<base_url>]")
    return model, base_url or None


class EndpointFailed(RuntimeError):
    """A batch whose every attempt failed; the message names the endpoint, the reason and the attempts."""


@dataclass
class EndpointStats:
    texts: int = 0
    batches: int = 0
    cached_batches: int = 0
    http_requests: int = 0  # attempts sent, retries included
    retries: int = 0
    prompt_tokens: int = 0


class EndpointEncoder:
    """A ``SentenceTransformer.encode`` look-alike backed by ``client.embeddings.create``.

    Args:
        model: the ``model`` sent with each request.
        base_url: the server (``.../v1``); None = ``OPENAI_BASE_URL`` or api.openai.com.
        api_key_env: environment variable holding the key (self-hosted servers usually ignore it).
        batch_size: texts per request.
        retry: attempts and backoff (``max_attempts``, ``backoff_base_s``, ``backoff_max_s``, ``timeout_s``).
        use_cache: cache each batch's embeddings under ``$EMBTUNE_CACHE/embeddings/endpoint``.
    """

    similarity_fn_name = "cosine"  # OpenAI embeddings are unit-length and compared by cosine

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 batch_size: int = 256, retry: LLMConfig | None = None, use_cache: bool = True):
        from openai import OpenAI

        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = os.environ.get(api_key_env, "")
        if self.base_url is None and not api_key:
            raise ValueError(f"endpoint model '{model}' goes to api.openai.com, which needs {api_key_env}; set it, "
                             f"or name a server: openai:{model}@http://host:port/v1")
        self.batch_size = batch_size
        self.retry = retry or LLMConfig()
        self.use_cache = use_cache
        self.stats = EndpointStats()
        self.max_seq_length = 0  # unknown to us; only part of the eval cache key
        # max_retries=0: retries are ours, counted, with the same policy as the LLM client.
        self._client = OpenAI(base_url=self.base_url, api_key=api_key or "not-needed", max_retries=0,
                              timeout=self.retry.timeout_s)
        self._rng = random.Random(0)

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "EndpointEncoder":
        model, base_url = parse_spec(spec)
        return cls(model, base_url, **kwargs)

    @property
    def cache_id(self) -> str:
        """What identifies this model's embeddings: the model name and the server it came from."""
        where = self.base_url or "api.openai.com"
        return hashlib.sha256(f"{self.model}\x00{where}".encode()).hexdigest()[:16]

    def _batch_path(self, texts: list[str]) -> Path:
        digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:24]
        return cache_dir() / "endpoint" / self.cache_id / f"{digest}.npy"

    def _request(self, texts: list[str]) -> np.ndarray:
        import openai

        reason = ""
        for attempt in range(1, self.retry.max_attempts + 1):
            self.stats.http_requests += 1
            retry_after = None
            try:
                response = self._client.embeddings.create(model=self.model, input=texts)
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                reason = f"{type(err).__name__}: {err}"
            except openai.APIStatusError as err:
                reason = status_reason(err.status_code)
                if not (err.status_code in RETRYABLE_STATUS or err.status_code >= 500):
                    raise EndpointFailed(f"{self.base_url or 'api.openai.com'} model '{self.model}': {reason}: "
                                         f"{err.message}") from None
                retry_after = retry_after_seconds(err)
            else:
                rows = sorted(response.data, key=lambda d: d.index)
                if len(rows) != len(texts):
                    raise EndpointFailed(f"model '{self.model}' returned {len(rows)} embeddings for {len(texts)} "
                                         "inputs")
                usage = getattr(response, "usage", None)
                self.stats.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
                return np.asarray([d.embedding for d in rows], dtype=np.float32)  # (len(texts), dim)
            if attempt < self.retry.max_attempts:
                self.stats.retries += 1
                delay = backoff_delay(attempt, self.retry, retry_after, self._rng)
                logger.warning("embeddings %s (attempt %d/%d); retrying in %.1fs", reason, attempt,
                               self.retry.max_attempts, delay)
                time.sleep(delay)
        raise EndpointFailed(f"{self.base_url or 'api.openai.com'} model '{self.model}': {reason} after "
                             f"{self.retry.max_attempts} attempts")

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress_bar: bool = False,
               normalize_embeddings: bool = True, **_ignored) -> np.ndarray:
        """Embeddings of ``texts``, (len(texts), dim) float32, in order; cached batches are not re-requested.

        ``batch_size`` is ignored (the endpoint's is ``self.batch_size``) so the eval's local batch size does not
        change what the cache holds.
        """
        from tqdm.auto import tqdm

        texts = list(texts)
        # Empty strings are refused by the API; a single space embeds "nothing" the same way everywhere.
        texts = [t if t.strip() else " " for t in texts]
        parts: list[np.ndarray] = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc=f"embeddings {self.model}", disable=not show_progress_bar, unit="batch"):
            batch = texts[start:start + self.batch_size]
            self.stats.batches += 1
            self.stats.texts += len(batch)
            path = self._batch_path(batch) if self.use_cache else None
            if path is not None and path.is_file():
                self.stats.cached_batches += 1
                parts.append(np.load(path))
                continue
            rows = self._request(batch)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, rows)
                os.replace(tmp, path)  # whole files only: a killed run leaves no half-written batch
            parts.append(rows)
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        embeddings = np.concatenate(parts)  # (len(texts), dim)
        return normalize(embeddings) if normalize_embeddings else embeddings

    def close(self) -> None:
        self._client.close()
